"""Build the published site (etbench's report as the front page, asv's pages alongside), make it work offline, and check that it renders.

asv 0.6's ``index.html`` loads jQuery, flot, bootstrap and three small jQuery
plugins from public CDNs, so ``results/html`` shows nothing but asv's
"failed to load" page on a machine without internet access.  This module

* ``vendor``: rewrites every CDN ``<script src>`` / ``<link href>`` in the
  published HTML to a local copy under ``<html_dir>/vendor/``, taking the files
  from npm registry packages (``npm pack``) that are downloaded once into a
  cache directory and verified against pinned tarball hashes; and
* ``build``: makes etbench's own report the site's front page (asv's index
  moves to ``asv.html``): per benchmark family the sortable summary table,
  interactive Vega-Lite plots (vega-embed, vendored like asv's scripts), the
  report's PNGs, interleaved comparisons, the isoFLOP sweep, links into asv's
  per-benchmark graphs, and ``compare.html`` against the previous commit; and
* ``check``: opens the site in headless Chromium, served from a localhost
  HTTP server with all other host names made unresolvable, and verifies that
  asv's JavaScript really ran (benchmark names and flot plots in the DOM),
  that every front-page chart was drawn as SVG, and that no element still
  points at an external host.

Command line::

    python -m impls.site build results/html [--runs-root results/runs] [--runs DIR] [--previous DIR]
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
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import urllib.parse
import warnings
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


class NoRunsError(SiteError):
    """No run records to build the front page from: the site keeps asv's pages only."""


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
ASV_CDN_ASSETS: dict[str, Asset] = {
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

# The front page's interactive plots: Vega-Lite specs rendered by vega-embed.  The page names the
# jsDelivr copies of the npm packages' UMD builds (jsDelivr serves npm files byte for byte), and
# ``vendor`` replaces them with the same files from the pinned registry tarballs.
VEGA = "vega@6.4.0"
VEGA_LITE = "vega-lite@6.5.0"
VEGA_EMBED = "vega-embed@7.3.0"
REPORT_CDN_ASSETS: dict[str, Asset] = {
    f"https://cdn.jsdelivr.net/npm/{VEGA}/build/vega.min.js": Asset(VEGA, "build/vega.min.js"),
    f"https://cdn.jsdelivr.net/npm/{VEGA_LITE}/build/vega-lite.min.js": Asset(VEGA_LITE, "build/vega-lite.min.js"),
    f"https://cdn.jsdelivr.net/npm/{VEGA_EMBED}/build/vega-embed.min.js": Asset(VEGA_EMBED, "build/vega-embed.min.js"),
}
CDN_ASSETS: dict[str, Asset] = {**ASV_CDN_ASSETS, **REPORT_CDN_ASSETS}

# sha512 of each registry tarball (npm's ``dist.integrity``).  Pinning them
# keeps publishing reproducible and lets a cached tarball be trusted offline.
PACKAGE_INTEGRITY: dict[str, str] = {
    "jquery@3.3.1": "sha512-Ubldcmxp5np52/ENotGxlLe6aGMvmF4R8S6tZjsP6Knsaxd/xp3Zrh50cG93lR6nPXyUFwzN3ZSOQI0wRJNdGg==",
    "flot@0.8.3": "sha512-xg2otcTJDvS+ERK+my4wxG/ASq90QURXtoM4LhacCq0jQW2jbyjdttbRNqU2cPykrpMvJ6b2uSp6SAgYAzj9tQ==",
    "flot-orderbars@1.0.0": "sha512-Jv51fvzevUjNXEeozpwEKfPjhiZhfiJddv0WHjduUTCmSF+7T5K7C9c9Y1wIVmUhDBv5fLMjgbwKecT0GIKPZA==",
    "stupid-table-plugin@1.1.3": "sha512-2Vk7XouQPxUQPRe9w0Fu7ZZ8kHLK7rDoLMsCgtKxRNJ7f4dSOGvW9CkHsq5wD6QsaEnWoyLBYH3xOEsrK3yWBg==",
    "blueimp-md5@2.19.0": "sha512-DRQrD6gJyy8FbiE4s+bDoXS9hiW3Vbx5uCdwvcCf3zLHL+Iv7LtGHLpr+GZV8rHG8tK766FGYBwRbu8pELTt+w==",
    "bootstrap@3.1.1": "sha512-TAzqS8E/ISpVHP29gYhy+1NSV+FJwApDVQhDfgLYsIuUDJiqJzH2DfORN5tiu+Ie2iBLrzEG34t4Rf465cigqg==",
    VEGA: "sha512-rHXCq2LpEWCLMjXBEj7hocY9G0/i5TGYRayGGSj06VTF4+l2IG2Z7oeZKCjWbUh/7hTE/mVhbaOPB72wCElh6g==",
    VEGA_LITE: "sha512-fMXF6s0MrIg0UTWnLIfeFtgSLzVhyzSKobzGrh5rhS+mL6FOYFG3m7ouJ4U23gj65EK+gl9FIIT5w7wLNaAzkA==",
    VEGA_EMBED: "sha512-wQ8s5GaSzqoKgmRfbRolgBrjE2CP7ZKHXqH7NijxMqPjpdWxSs4Dn8tvp9g0giQvh2cK+3p56sxjWWM0wNngGw==",
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
# Front page: etbench's own report, with asv's pages alongside
# --------------------------------------------------------------------------

#: asv's own front page is moved here by ``build``; index.html becomes etbench's report.
ASV_PAGE = "asv.html"
#: Marks the front page written by ``build`` (so a rebuild never mistakes it for asv's page).
FRONT_PAGE_MARKER = '<meta name="generator" content="etbench-report">'
REPORT_SUBDIR = "report"
VEGA_LITE_SCHEMA = "https://vega.github.io/schema/vega-lite/v6.json"

#: Family folder of the run records -> (asv benchmark classes, regex of the record's file stem
#: giving the class's parameters).  The asv URL of a record is ``asv.html#<module>.<Class>.<method>
#: ?p-<param>=<value repr>`` (asv 0.6's graphdisplay.js matches ``p-<name>`` against the
#: parameter reprs of index.json); a stem that does not parse links the class's graph unfiltered.
ASV_FAMILIES: dict[str, tuple[tuple[str, ...], str | None]] = {
    "baseline": (("bench_baseline.BaselineTraining", "bench_baseline.BaselineStep"),
                 r"baseline-(?P<model>.+)-ws(?P<world_size>\d+)"),
    "technique": (("bench_techniques.Techniques",), r"technique-(?P<variant>.+)"),
    "checkpoint": (("bench_techniques.CheckpointCurve",), r"checkpoint-curve-every(?P<every>\d+)"),
    "accum": (("bench_techniques.AccumulationMemory",), r"accum-(?P<how>[a-z]+)-(?P<effective_batch>\d+)"),
    "attention": (("bench_techniques.AttentionScaling",), r"attention-(?P<kind>[a-z]+)-T(?P<seq_len>\d+)"),
    "optimizers": (("bench_optimizers.Optimizers",), r"optimizers-(?P<optimizer>.+)"),
    "largebatch": (("bench_optimizers.LargeBatch",), r"largebatch-(?P<optimizer>[a-z0-9]+)-b(?P<global_batch>\d+)"),
    "isoflop": (("bench_mod.MoDIsoFLOP", "bench_mod.MoDForwardFLOPs", "bench_mod.MoDCausalSampling"), None),
    "pruning": (("bench_pruning.Pruning", "bench_pruning.PruningSpeed"), r"pruning-(?P<variant>.+)"),
    "quant": (("bench_quant.Quant", "bench_quant.QuantSpeed"), r"quant-(?P<variant>.+)"),
    "lowrank": (("bench_lowrank.LowRank", "bench_lowrank.LowRankSpeed"), r"lowrank-(?P<variant>.+)"),
    "actmem": (("bench_actmem.ActMem", "bench_actmem.ActMemSpeed"), r"actmem-(?P<variant>.+)"),
    "sparse": (("bench_sparse.SparseEmbedding", "bench_sparse.SparseEmbeddingSpeed", "bench_sparse.SparseStorage"),
               r"sparse-(?P<variant>.+)"),
    "seqlen": (("bench_seqlen.SeqlenWarmup",), r"seqlen-(?P<variant>.+)"),
    "datacomp": (("bench_datacomp.DataCompression",), None),
    "distill": (("bench_distill.Distill", "bench_distill.DistillSpeed"), r"distill-(?P<variant>.+)"),
    "ltd": (("bench_ltd.RandomLTD",), r"ltd-(?P<variant>.+)"),
    "mae": (("bench_mae.Mae", "bench_mae.MaeSpeed"),
            r"mae-(?P<variant>.+)"),
    "tokendrop": (("bench_tokendrop.TokenDrop", "bench_tokendrop.TokenDropSpeed"), r"tokendrop-(?P<variant>.+)"),
}
#: Which of a class's benchmarks a record's row links to, best first.
_PREFERRED_METHODS = ("track_seconds_per_mtok", "time_train_step", "track_val_loss_at_budget",
                      "track_activations_bytes", "track_min_loss_fitted")
_FAMILY_ORDER = ("baseline", "technique", "attention", "checkpoint", "accum", "optimizers", "largebatch")
_COMMIT_DIR = re.compile(r"^[0-9a-f]{7,40}$")

PAGE_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0; color: #1d2330; background: #fff; }
header { background: #1f3a5f; color: #fff; padding: 14px 28px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header a { color: #cfe3ff; }
header .meta { font-size: 13px; opacity: .9; }
nav.families { background: #eef2f7; padding: 8px 28px; font-size: 14px; border-bottom: 1px solid #d5dce6; position: sticky; top: 0; z-index: 5; }
nav.families a { margin-right: 14px; }
main { padding: 8px 28px 40px; }
section.family { border-top: 2px solid #d5dce6; margin-top: 22px; padding-top: 4px; }
h2 { font-size: 20px; margin: 10px 0 4px; }
h3 { font-size: 15px; margin: 16px 0 4px; color: #34405a; }
.links, .note { font-size: 13px; color: #4a5568; }
.charts { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
figure { margin: 6px 0; }
figcaption { font-size: 12px; color: #4a5568; }
.chart { min-height: 60px; }
.chart[data-error] { color: #b3261e; }
.badge { display: inline-block; padding: 1px 7px; border-radius: 9px; font-size: 12px; font-weight: 600; }
.badge.noisy { background: #ffe8a3; color: #6b4e00; }
.badge.quiet { background: #d8f3dc; color: #1b5e20; }
.badge.refused { background: #fdecea; color: #8a1c10; }
.scroll { overflow-x: auto; max-width: 100%; }
img.static { max-width: 100%; border: 1px solid #e2e8f0; }
details { margin: 6px 0; }
table.sortable td { white-space: nowrap; }
table.sortable td.text a { white-space: normal; }
.refused-reason { font-size: 13px; color: #8a1c10; margin: 2px 0; }
#vega-missing { display: none; background: #fdecea; color: #8a1c10; padding: 8px 28px; }
"""

_EMBED_JS = """
(function () {
  var specs = JSON.parse(document.getElementById('etbench-specs').textContent);
  if (typeof vegaEmbed === 'undefined') {
    document.getElementById('vega-missing').style.display = 'block';
    document.body.setAttribute('data-vega-missing', 'yes');
    return;
  }
  Object.keys(specs).forEach(function (id) {
    var el = document.getElementById(id);
    vegaEmbed(el, specs[id], {renderer: 'svg', actions: {export: true, source: false, compiled: false, editor: false}})
      .then(function () { el.setAttribute('data-rendered', 'yes'); })
      .catch(function (err) { el.setAttribute('data-error', String(err)); el.textContent = 'chart failed: ' + err; });
  });
})();
"""


def _json_safe(value):
    """Plain JSON values (NaN/inf and numpy scalars become null/float), recursively."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if number != number or number in (float("inf"), float("-inf")):
        return None
    return int(number) if isinstance(value, int) or (hasattr(value, "dtype") and value.dtype.kind in "iu") else number


def _esc(text) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def commit_runs_dirs(runs_root: Path) -> list[Path]:
    """Commit folders of ``runs_root`` (``results/runs/<short hash>/``) holding records, oldest
    first (by their newest record's modification time)."""
    found = []
    for path in Path(runs_root).iterdir() if Path(runs_root).is_dir() else ():
        if path.is_dir() and _COMMIT_DIR.match(path.name):
            times = [p.stat().st_mtime for p in path.rglob("*.json")]
            if times:
                found.append((max(times), path.name, path))
    return [path for _, _, path in sorted(found)]


class AsvIndex:
    """The benchmarks of asv's ``index.json``, for links into asv's per-benchmark graphs."""

    def __init__(self, html_dir: Path):
        try:
            self.benchmarks = json.loads((Path(html_dir) / "index.json").read_text())["benchmarks"]
        except (OSError, ValueError, KeyError):
            self.benchmarks = {}

    def of_class(self, cls: str) -> list[str]:
        return sorted(name for name in self.benchmarks if name.rsplit(".", 1)[0] == cls)

    def family_links(self, family: str) -> list[tuple[str, str]]:
        """(text, href) of every asv benchmark of the family's classes."""
        classes, _ = ASV_FAMILIES.get(family, ((), None))
        return [(name.split(".", 1)[1], f"{ASV_PAGE}#{name}") for cls in classes for name in self.of_class(cls)]

    def record_href(self, family: str, stem: str) -> str | None:
        """asv's graph of the record's benchmark, filtered to its parameters where they parse."""
        classes, pattern = ASV_FAMILIES.get(family, ((), None))
        if not classes:
            return None
        names = self.of_class(classes[0])
        if not names:
            return None
        name = next((f"{classes[0]}.{m}" for m in _PREFERRED_METHODS if f"{classes[0]}.{m}" in names), names[0])
        match = re.fullmatch(pattern, stem) if pattern else None
        info = self.benchmarks[name]
        query = []
        if match:
            for param, choices in zip(info.get("param_names") or [], info.get("params") or []):
                value = match.groupdict().get(param)
                chosen = next((c for c in (repr(value), value) if value is not None and c in choices), None)
                if chosen is None:
                    query = []
                    break
                query.append(f"p-{urllib.parse.quote(param, safe='')}={urllib.parse.quote(chosen, safe='')}")
        return f"{ASV_PAGE}#{name}" + ("?" + "&".join(query) if query else "")


def _recipe_text(run, key: str) -> str:
    value = run.get(f"recipe.{key}")
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return "" if value is None or value != value else str(value)


def _run_fields(run) -> dict:
    """Key record fields for a chart's tooltip."""
    from .. import report

    median, ci = run.get("step_time.median"), run.get("step_time.ci95")
    return {
        "run": run["run"], "record": Path(run["source"]).stem if run.get("source") else None,
        "techniques": _recipe_text(run, "techniques"), "optimizer": _recipe_text(run, "optimizer"),
        "model": _recipe_text(run, "model"), "batch": _recipe_text(run, "batch_size"),
        "seq_len": _recipe_text(run, "seq_len"), "world_size": run.get("world_size"),
        "tokens/s": run.get("tokens_per_second"),
        "s/step [95% CI]": report.median_ci(median, ci) or report.format_value(run.get("seconds_per_step")),
        "MFU": run.get("mfu"), "HFU": run.get("hfu"),
        "noisy": {True: "NOISY", False: "quiet"}.get(_bool(run.get("load.noisy")), "not recorded"),
        "final val loss": run.get("final_val_loss"),
    }


def _bool(value):
    return None if value is None or value != value else bool(value)


_TOOLTIP_RUN = [
    {"field": "run", "type": "nominal"}, {"field": "techniques", "type": "nominal"},
    {"field": "optimizer", "type": "nominal"}, {"field": "model", "type": "nominal"},
    {"field": "batch", "type": "nominal"}, {"field": "seq_len", "type": "nominal"},
    {"field": "world_size", "type": "quantitative"},
    {"field": "tokens/s", "type": "quantitative", "format": ",.0f"},
    {"field": "s/step [95% CI]", "type": "nominal"},
    {"field": "MFU", "type": "quantitative", "format": ".1%"}, {"field": "HFU", "type": "quantitative", "format": ".1%"},
    {"field": "noisy", "type": "nominal"}, {"field": "final val loss", "type": "quantitative", "format": ".4f"},
]


def _legend_pick():
    return [{"name": "pick", "select": {"type": "point", "fields": ["run"]}, "bind": "legend"}]


def spec_loss_vs_flops(runs) -> list[dict]:
    """One Vega-Lite chart per dataset hash: validation loss vs cumulative FLOPs (log x)."""
    from .. import report

    specs = []
    curves = report.curve_frame(runs)
    curves = curves[curves["val_loss"].notna() & (curves["flops"] > 0)]
    fields = {run["run"]: _run_fields(run) for _, run in runs.iterrows()}
    for digest in dict.fromkeys(runs["dataset.hash"]):
        points = curves[curves["dataset.hash"] == digest]
        if points.empty:
            continue
        values = [{**fields[p["run"]], "flops": p["flops"], "val_loss": p["val_loss"], "step": p["step"],
                   "tokens": p["tokens"]} for _, p in points.iterrows()]
        tooltip = [{"field": "run", "type": "nominal"}, {"field": "step", "type": "quantitative"},
                   {"field": "flops", "type": "quantitative", "format": ".3s"},
                   {"field": "val_loss", "type": "quantitative", "format": ".4f"}, *_TOOLTIP_RUN[1:]]
        colour = {"field": "run", "type": "nominal", "sort": list(runs["run"]),
                  "legend": {"labelLimit": 320, "symbolLimit": 60}}
        x = {"field": "flops", "type": "quantitative", "scale": {"type": "log"},
             "title": "cumulative training FLOPs (log)", "axis": {"format": ".0e", "tickCount": 5}}
        y = {"field": "val_loss", "type": "quantitative", "scale": {"zero": False},
             "title": "validation loss (nats/token)"}
        opacity = {"condition": {"param": "pick", "value": 1}, "value": 0.12}
        layers = [
            {"mark": {"type": "line", "interpolate": "linear"},
             "encoding": {"x": x, "y": y, "color": colour, "opacity": opacity}, "params": _legend_pick()},
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
            "data": {"values": _json_safe(values)},
            "layer": layers,
        })
    return specs


def spec_throughput(runs) -> dict:
    """Tokens/s per run with the 95% interval of its step time, and the exact memory breakdown."""
    from .. import report

    values, memory = [], []
    for _, run in runs.iterrows():
        row = _run_fields(run)
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
        "width": 330, "height": height, "data": {"values": _json_safe(values)},
        "layer": [
            {"mark": {"type": "bar", "color": "#4c72b0"},
             "encoding": {"y": y, "x": {"field": "tokens/s", "type": "quantitative", "title": "tokens / second"},
                          "tooltip": _TOOLTIP_RUN}},
            {"mark": {"type": "rule", "color": "#111"},
             "encoding": {"y": y, "x": {"field": "tok_lo", "type": "quantitative"}, "x2": {"field": "tok_hi"}}},
        ],
    }
    mem = {
        "title": "Exact memory breakdown (MiB)", "width": 330, "height": height,
        "data": {"values": _json_safe(memory)},
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
    fields = {run["run"]: _run_fields(run) for _, run in runs.iterrows()}
    values = [{**fields.get(r["run"], {"run": r["run"]}), "speed ratio": r["speed ratio"],
               "speed lo": r.get("speed ratio lo"), "speed hi": r.get("speed ratio hi"),
               "loss delta": r["loss delta"]} for _, r in comparison.iterrows()]
    order = list(comparison["run"])
    y = {"field": "run", "type": "nominal", "sort": order, "title": None, "axis": {"labelLimit": 300}}
    tooltip = [{"field": "run", "type": "nominal"}, {"field": "speed ratio", "type": "quantitative", "format": ".3f"},
               {"field": "loss delta", "type": "quantitative", "format": "+.4f"}, *_TOOLTIP_RUN[1:]]
    height = max(60, 20 * len(order))
    return {
        "$schema": VEGA_LITE_SCHEMA, "data": {"values": _json_safe(values)},
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
            {"width": 330, "height": height, "data": {"values": _json_safe(values)}, "layer": [
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
            {"width": 260, "height": height, "data": {"values": _json_safe(memory)}, "layer": [
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


def spec_isoflop(points, fits) -> dict:
    """isoFLOP curves: final loss vs parameters per budget (one panel each), the fitted parabola
    in log-params and its optimum (filled where the optimum lies inside the sampled sizes)."""
    import math

    values = []
    for _, p in points.iterrows():
        values.append({"kind": "point", "variant": p["variant"], "budget": f"{p['budget']:.0e} FLOPs",
                       "size": p["size"], "params": p["params"], "loss": p["final_val_loss"], "steps": p["steps"],
                       "tokens": p["tokens"], "seconds_per_step": p["seconds_per_step"], "status": p["status"]})
    for _, f in fits.iterrows():
        budget = f"{f['budget']:.0e} FLOPs"
        sizes = points[(points["variant"] == f["variant"]) & (points["budget"] == f["budget"])]["params"]
        if sizes.empty or not all(map(math.isfinite, (f["a"], f["b"], f["c"]))):
            continue
        lo, hi = math.log(sizes.min()), math.log(sizes.max())
        for i in range(41):
            x = lo + (hi - lo) * i / 40
            values.append({"kind": "fit", "variant": f["variant"], "budget": budget, "params": math.exp(x),
                           "loss": f["a"] * x * x + f["b"] * x + f["c"]})
        if math.isfinite(f["n_opt"]) and lo - 1 <= math.log(max(f["n_opt"], 1e-300)) <= hi + 1:
            values.append({"kind": "optimum", "variant": f["variant"], "budget": budget, "params": f["n_opt"],
                           "loss": f["loss_opt"], "status": f["status"], "n_opt_lo": f["n_opt_lo"],
                           "n_opt_hi": f["n_opt_hi"], "inside": "inside sampled sizes" if f["status"] == "ok"
                           else "outside / uncertain"})
    colour = {"field": "variant", "type": "nominal"}
    x = {"field": "params", "type": "quantitative", "scale": {"type": "log"}, "title": "parameters (log)"}
    y = {"field": "loss", "type": "quantitative", "scale": {"zero": False}, "title": "final validation loss"}
    return {
        "$schema": VEGA_LITE_SCHEMA, "data": {"values": _json_safe(values)},
        "title": {"text": "isoFLOP curves", "subtitle": "points: runs; lines: parabola fit in log(params); "
                                                         "diamonds: fitted optimum (hollow: outside the sampled sizes)"},
        "facet": {"column": {"field": "budget", "type": "nominal", "title": "budget"}},
        "spec": {"width": 300, "height": 260, "layer": [
            {"transform": [{"filter": "datum.kind == 'fit'"}], "mark": {"type": "line", "opacity": 0.7},
             "encoding": {"x": x, "y": y, "color": colour}},
            {"transform": [{"filter": "datum.kind == 'point'"}], "mark": {"type": "point", "filled": True, "size": 50},
             "encoding": {"x": x, "y": y, "color": colour, "tooltip": [
                 {"field": f, "type": t, **({"format": fm} if fm else {})} for f, t, fm in
                 (("variant", "nominal", None), ("size", "nominal", None), ("params", "quantitative", ","),
                  ("loss", "quantitative", ".4f"), ("steps", "quantitative", None), ("tokens", "quantitative", ","),
                  ("seconds_per_step", "quantitative", ".4g"), ("status", "nominal", None))]}},
            {"transform": [{"filter": "datum.kind == 'optimum'"}],
             "mark": {"type": "point", "shape": "diamond", "size": 160, "strokeWidth": 2},
             "encoding": {"x": x, "y": y, "color": colour,
                          "fill": {"condition": {"test": "datum.status == 'ok'", "field": "variant", "type": "nominal"},
                                   "value": "transparent"},
                          "tooltip": [{"field": f, "type": t, **({"format": fm} if fm else {})} for f, t, fm in
                                      (("variant", "nominal", None), ("params", "quantitative", ",.0f"),
                                       ("n_opt_lo", "quantitative", ",.0f"), ("n_opt_hi", "quantitative", ",.0f"),
                                       ("loss", "quantitative", ".4f"), ("status", "nominal", None))]}},
        ]},
        "resolve": {"scale": {"x": "shared", "y": "shared"}},
    }


class _Page:
    """Collects the chart specs of a page; each chart is a ``<div>`` vega-embed fills."""

    def __init__(self):
        self.specs: dict[str, dict] = {}

    def chart(self, spec: dict, *, png: str | None = None, caption: str = "") -> str:
        chart_id = f"chart-{len(self.specs) + 1}"
        self.specs[chart_id] = spec
        links = f' <a href="{_esc(png)}">static PNG</a>' if png else ""
        return (f'<figure><div class="chart" id="{chart_id}"></div>'
                f"<figcaption>{_esc(caption)}{links}</figcaption></figure>")


def _family_table(group, refused: list[dict], asv: AsvIndex, family: str) -> str:
    from .. import report

    rows, classes = [], []
    for _, run in group.iterrows():
        stem = Path(run["source"]).stem if run.get("source") else ""
        href = asv.record_href(family, stem)
        median, ci = run.get("step_time.median"), run.get("step_time.ci95")
        noisy = _bool(run.get("load.noisy"))
        rows.append({
            "run": f'<a href="{_esc(href)}" title="asv history of this benchmark">{_esc(run["run"])}</a>'
                   if href else _esc(run["run"]),
            "techniques": _recipe_text(run, "techniques"), "optimizer": _recipe_text(run, "optimizer"),
            "model": _recipe_text(run, "model"), "params": run.get("params"),
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
        rows.append({"run": _esc(entry["label"]), "techniques": ", ".join(map(str, recipe.get("techniques") or [])) or "none",
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
        f'<p class="refused-reason"><span class="badge refused">refused</span> <b>{_esc(e["label"])}</b> '
        f'(<code>{_esc(Path(e["source"]).name)}</code>), not plotted: {_esc("; ".join(e["reasons"]))}</p>'
        for e in refused)


def _interleaved_block(record: dict, page: _Page, png: str | None) -> str:
    from .. import report

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
    return (f"<h3>Interleaved comparison {_esc(report.interleaved_name(record)[len('interleaved-'):])} "
            f"vs {_esc(record['baseline'])} {badge}</h3>"
            f'<p class="note">{_esc(record.get("rounds"))} rounds × {_esc(record.get("steps_per_round"))} steps per variant '
            f"(after {_esc(record.get('warmup_steps'))} warm-up steps), variants run interleaved so a burst of load hits "
            f"all alike; {_esc(record.get('ci_method', ''))}. 1-min load {_esc(load.get('load1_start'))} → "
            f"{_esc(load.get('load1_end'))} on {_esc(load.get('cores_in_use'))} cores in use. A variant is called "
            "faster/slower only where its interval excludes 1.</p>"
            + page.chart(spec_interleaved(record), png=png, caption="Hover a bar for the recipe and the intervals.")
            + f'<div class="scroll">{html_table}</div>')


def _copy_files(src_dir: Path, dest_dir: Path, patterns: Sequence[str]) -> list[str]:
    copied = []
    if not Path(src_dir).is_dir():
        return copied
    dest_dir.mkdir(parents=True, exist_ok=True)
    for pattern in patterns:
        for path in sorted(Path(src_dir).glob(pattern)):
            if path.is_file():
                shutil.copyfile(path, dest_dir / path.name)
                copied.append(path.name)
    return copied


def _isoflop_section(iso_dir: Path, html_dir: Path, page: _Page, asv: AsvIndex) -> str:
    import pandas as pd

    from .. import report

    rel = f"{REPORT_SUBDIR}/isoflop-{iso_dir.name}"
    copied = set(_copy_files(iso_dir, html_dir / rel, ("*.png", "*.csv", "*.json")))
    parts = [f'<section class="family" id="isoflop-{_esc(iso_dir.name)}"><h2>isoFLOP sweep (MoD): {_esc(iso_dir.name)}</h2>']
    links = asv.family_links("isoflop")
    if links:
        parts.append('<p class="links">asv history: ' + " · ".join(
            f'<a href="{_esc(h)}">{_esc(t)}</a>' for t, h in links) + "</p>")
    try:
        points = pd.read_csv(iso_dir / "points.csv")
        fits = pd.read_csv(iso_dir / "fits.csv")
    except (OSError, ValueError) as exc:
        parts.append(f'<p class="note">no isoFLOP tables readable in {_esc(iso_dir)}: {_esc(exc)}</p>')
        points = fits = None
    if points is not None:
        parts.append(page.chart(spec_isoflop(points, fits),
                                png=f"{rel}/isoflop.png" if "isoflop.png" in copied else None,
                                caption="Hover a point for the run, a diamond for the fitted optimum and its interval."))
        fit_rows = []
        for _, f in fits.iterrows():
            fit_rows.append({"variant": f["variant"], "budget": f["budget"], "sizes": f["n_sizes"],
                             "optimal params": f["n_opt"],
                             "95% interval": f"[{f['n_opt_lo']:.3g}, {f['n_opt_hi']:.3g}]",
                             "loss at optimum": f["loss_opt"], "± se": f["loss_opt_se"], "status": f["status"],
                             "nearest size": f["nearest_size"]})
        parts.append("<h3>Fitted optima</h3>" + report.html_table(
            fit_rows, list(fit_rows[0]) if fit_rows else ["variant"],
            formats={"budget": "{:.0e}", "sizes": "{:.0f}", "optimal params": "{:,.0f}", "loss at optimum": "{:.4f}",
                     "± se": "{:.3g}"},
            text_columns=("variant", "95% interval", "status", "nearest size"), table_id=f"fits-{iso_dir.name}"))
    try:
        power = pd.read_csv(iso_dir / "power_law.csv")
        power_rows = [{k: (None if v != v else v) for k, v in r.items()} for r in power.to_dict("records")]
        parts.append("<h3>Power law N<sub>opt</sub> ∝ C<sup>a</sup></h3>" + report.html_table(
            power_rows, list(power.columns), text_columns=("variant", "status"), table_id=f"power-{iso_dir.name}"))
    except (OSError, ValueError):
        pass
    try:
        causal = json.loads((iso_dir / "causal_sampling.json").read_text())
        parts.append("<h3>Causal sampling (MoD router at inference)</h3><p class=\"note\">" + ", ".join(
            f"{_esc(k)} = {_esc(f'{v:.4g}' if isinstance(v, float) else v)}" for k, v in causal.items()) + "</p>")
    except (OSError, ValueError):
        pass
    figures = [(name, caption) for name, caption in (
        ("routing.png", "MoD routing: which tokens the router sends through each block"),
        ("loss_vs_flops.png", "loss vs FLOPs of the sweep's runs"),
        ("step_time.png", "step time of the optimal sizes vs the baseline")) if name in copied]
    if figures:
        parts.append('<div class="charts">' + "".join(
            f'<figure><a href="{rel}/{n}"><img class="static" src="{rel}/{n}" alt="{_esc(c)}" width="640"></a>'
            f"<figcaption>{_esc(c)}</figcaption></figure>" for n, c in figures) + "</div>")
    parts.append("</section>")
    return "".join(parts)


def _peak_paragraph(plots_dir: Path) -> str:
    try:
        log = json.loads((plots_dir / "peak.json").read_text())
    except (OSError, ValueError):
        return ""
    items = []
    for phase in ("start", "end"):
        if phase in log:
            peaks = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in log[phase].get("peaks", {}).items())
            items.append(f"{phase}: {peaks} GFLOP/s (1-min load {log[phase].get('load1', 0):.2f})")
    badge = ('<span class="badge noisy">noisy</span>' if log.get("noisy") else '<span class="badge quiet">quiet</span>')
    return (f'<div class="meta">Peak FLOP/s probed around the run (MFU denominator): {_esc("; ".join(items))} '
            f'{badge} <span title="{_esc(log.get("rule"))}">ⓘ</span></div>')


# --------------------------------------------------------------------------
# Data-parallel and sharded training (issue 10)
# --------------------------------------------------------------------------

def spec_dp_model_states(frame, lines) -> dict:
    """Per-rank model-state MiB vs world size, one panel per component: measured points and the
    ZeRO formula as lines (same colour per technique)."""
    from .. import report

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
        "$schema": VEGA_LITE_SCHEMA, "data": {"values": _json_safe(values)},
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
    from .. import report

    values = [{"technique": r["technique"], "n_d": r["n_d"], "efficiency": r["efficiency"], "lo": r["lo"],
               "hi": r["hi"], "reference": r["reference"], "tokens/s per rank": r["tokens_per_rank"],
               "oversubscribed": "oversubscribed" if _bool(r["oversubscribed"]) else "no"}
              for _, r in table.iterrows() if r["efficiency"] == r["efficiency"]]
    x = {"field": "n_d", "type": "quantitative", "scale": {"type": "log", "base": 2}, "title": "data-parallel ranks N",
         "axis": {"values": sorted({int(n) for n in table["n_d"]}), "format": "d"}}
    y = {"field": "efficiency", "type": "quantitative", "title": "tokens/s per rank ÷ 1 rank"}
    colour = {"field": "technique", "type": "nominal"}
    return {
        "$schema": VEGA_LITE_SCHEMA, "width": 420, "height": 280, "data": {"values": _json_safe(values)},
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
    from .. import report

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
        "data": {"values": _json_safe(values)},
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
        "$schema": VEGA_LITE_SCHEMA, "data": {"values": _json_safe(values)},
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
    from .. import report
    from ..measure import model_states as ms

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
            f'<p class="note">{_esc(ms.MEMORY_TABLE_NOTE)}</p><div class="scroll">'
            + report.html_table(rows, columns, formats={"Ψ": "{:,.0f}", "N_d": "{:.0f}", **gib},
                                text_columns=("model", "technique", columns[8], "offload fits"),
                                table_id="data-parallel-memory") + "</div>")


def data_parallel_section(loaded, page: "_Page", copied: set, rel_plots: str) -> str:
    """The front page's "Data-parallel and sharded training" section: model states vs the ZeRO
    formulas, scaling efficiency, communication volume, bus bandwidth (``etbench comm`` records)
    and the big-model memory table; empty when the runs have no ``model_states`` block and there
    is no comm record."""
    from .. import report

    import pandas as pd

    frame = report.data_parallel_frame(pd.concat([loaded.runs, report.interleaved_parallel_runs(loaded.interleaved)],
                                                 ignore_index=True))
    bw = report.comm_bandwidth_frame(loaded.comm)
    if frame.empty and bw.empty:
        return ""
    names = report.DATA_PARALLEL_FILES

    def png(kind):
        name = f"{names[kind]}.png"
        return f"{rel_plots}/{name}" if name in copied else None

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
    return ('<section class="family" id="data-parallel"><h2>Data-parallel and sharded training</h2>'
            f'<p class="note">{len(frame)} runs with per-rank model states checked against the ZeRO formulas, '
            f"{len(loaded.comm)} collective-bandwidth records.</p>"
            '<div class="charts">' + "".join(charts) + "</div>"
            + data_parallel_memory_html(report.data_parallel_memory_table()) + "</section>")


def compression_section(loaded, copied: set, rel_plots: str) -> str:
    """The front page's "Compression techniques" section (:mod:`impls.report.compression`): one
    sortable table of every pruning, quantized-training, low-rank, activation-compression and
    sparse-storage run against its family's baseline, and the report's curves (loss vs sparsity,
    loss vs rank, memory by component, the sparse-format crossover); empty without such records."""
    from .. import report
    from ..report import compression as rc

    import pandas as pd

    frame = rc.compression_frame(loaded.runs, loaded.interleaved)
    if frame.empty and not loaded.storage:
        return ""
    parts = ['<section class="family" id="compression"><h2>Compression techniques</h2>',
             '<p class="note">Each run against the baseline of its own family, trained to the same model-FLOP '
             "budget. Speed: baseline time per token ÷ the technique's, from interleaved rounds (95% interval); "
             "n/a where the technique was not timed. Memory: each exact component ÷ the baseline's.</p>"]
    if not frame.empty:
        rows = []
        for r in frame.to_dict("records"):
            lo, hi = r.get("speed_lo"), r.get("speed_hi")
            speed = r.get("speed_ratio")
            speed_text = (None if speed is None or speed != speed else
                          f"{speed:.3g} [{lo:.3g}, {hi:.3g}]" if lo == lo and hi == hi else f"{speed:.3g}")
            rows.append({"family": r["family"], "techniques": r["techniques"],
                         r["knob"] or "knob": None if pd.isna(r["knob_value"]) else str(r["knob_value"]),
                         "loss Δ": r["loss_delta"], "speed ratio": (speed_text, speed),
                         **{f"{c} ÷ base": r.get(f"{c} / baseline") for c in rc.COMPONENTS.values()},
                         "counted FLOPs ÷ base": r.get("counted flops / baseline")})
        columns = list(dict.fromkeys(k for row in rows for k in row))
        for row in rows:
            for c in columns:
                row.setdefault(c, None)
        parts.append('<div class="scroll">' + report.html_table(
            rows, columns, formats={"loss Δ": "{:+.4f}"},
            text_columns=[c for c in columns if c in ("family", "techniques") or c in {k for k, _ in rc.KNOBS.values()}],
            table_id="compression-table") + "</div>")
    figures = [(name, caption) for name, caption in (
        ("compression_memory.png", "memory by component per technique, normalised to its family baseline"),
        ("compression_loss_vs_sparsity.png", "loss at the budget vs sparsity, per pruning method"),
        ("compression_loss_vs_rank.png", "loss at the budget vs rank: factorised layers, LoRA, GaLore"),
        ("compression_sparse_crossover.png", "sparse storage: bytes and matmul time vs density per format"),
        ("compression_data.png", "training data: bytes per token per storage format, loader vs the step's need"))
        if name in copied]
    if figures:
        parts.append('<div class="charts">' + "".join(
            f'<figure><a href="{rel_plots}/{n}"><img class="static" src="{rel_plots}/{n}" alt="{_esc(c)}" width="640"></a>'
            f"<figcaption>{_esc(c)}</figcaption></figure>" for n, c in figures) + "</div>")
    parts.append("</section>")
    return "".join(parts)


def tokens_section(loaded, copied: set, rel_plots: str) -> str:
    """The front page's "Data and token efficiency" section (:mod:`impls.report.tokens`): one
    sortable table of every sequence-length warm-up, distillation, masked-token-dropping,
    random-LTD and token-dropping run against its group's baseline -- FLOPs saved counted vs
    analytic, the loss difference at the budget and at equal counted FLOPs, the interleaved speed
    ratio -- and the section's figures; empty without such records."""
    from .. import report
    from ..report import tokens as rt

    frame = rt.tokens_frame(loaded.runs, loaded.interleaved)
    if frame.empty:
        return ""
    parts = ['<section class="family" id="tokens"><h2>Data and token efficiency</h2>',
             '<p class="note">Each run against the baseline of its own group (same model, data, length, masked-LM '
             "rate and budget). FLOPs saved: counted over the steps as trained and the technique's analytic formula. "
             "Loss Δ at the budget, and at equal counted FLOPs (both validation curves read at the smaller run's "
             "total). Speed: baseline time per token ÷ the technique's, interleaved rounds (95% interval).</p>"]
    rows = []
    for r in frame.to_dict("records"):
        lo, hi, speed = r.get("speed_lo"), r.get("speed_hi"), r.get("speed_ratio")
        speed_text = (None if speed is None or speed != speed else
                      f"{speed:.3g} [{lo:.3g}, {hi:.3g}]" if lo == lo and hi == hi else f"{speed:.3g}")
        rows.append({"family": r["family"], "techniques": r["techniques"], "knob": r.get("knob_value"),
                     "budget": r.get("budget_flops"), "steps": r.get("steps"), "baseline steps": r.get("baseline_steps"),
                     "FLOPs saved (counted)": r.get("counted_flops_saved"),
                     "FLOPs saved (analytic)": r.get("analytic_flops_saved"),
                     "counted ÷ analytic": r.get("saved_counted_vs_analytic"),
                     "loss Δ at budget": r.get("loss_delta_at_budget"),
                     "loss Δ at equal counted FLOPs": r.get("loss_delta_at_equal_counted_flops"),
                     "speed ratio": (speed_text, speed)})
    columns = list(rows[0])
    parts.append('<div class="scroll">' + report.html_table(
        rows, columns, formats={"loss Δ at budget": "{:+.4f}", "loss Δ at equal counted FLOPs": "{:+.4f}"},
        text_columns=["family", "techniques", "knob", "budget"], table_id="tokens-table") + "</div>")
    figures = [(name, caption) for name, caption in (
        ("tokens_speedup_vs_mask_rate.png", "masked-token dropping: speed-up over the full-sequence encoder vs mask rate"),
        ("tokens_random_ltd_schedule.png", "random-LTD: kept tokens per middle layer over the steps, FLOPs saved"),
        ("tokens_distill_sweep.png", "distillation: student loss vs temperature per α, the student alone as a line"))
        if name in copied]
    if figures:
        parts.append('<div class="charts">' + "".join(
            f'<figure><a href="{rel_plots}/{n}"><img class="static" src="{rel_plots}/{n}" alt="{_esc(c)}" width="640"></a>'
            f"<figcaption>{_esc(c)}</figcaption></figure>" for n, c in figures) + "</div>")
    parts.append("</section>")
    return "".join(parts)


def build_front_page(html_dir: Path, runs_root: Path = Path("results/runs"),
                     plots_root: Path = Path("results/plots"), isoflop_root: Path = Path("results/isoflop"),
                     runs: Path | None = None, previous: Path | None = None,
                     published_root: Path | None = None) -> list[str]:
    """Make etbench's report the site's front page, asv's pages alongside.

    asv's ``index.html`` (written by ``asv publish``) is moved to ``asv.html``; the new
    ``index.html`` shows, per benchmark family of the latest runs directory (``runs`` or the
    newest commit folder under ``runs_root``): the summary table (sortable, step-time CIs, load
    flag, MFU/HFU, refused records with the reason), interactive Vega-Lite charts (loss vs FLOPs,
    throughput/memory, technique comparison, interleaved comparison) with the report's PNGs as
    static copies, the isoFLOP sweep of that commit, and links into asv's graphs.  With an
    earlier commit folder (``previous``, default the one before), ``compare.html`` compares the
    two.  The page names the plotting library's CDN URLs; ``vendor`` replaces them with local
    copies.  Machines published under ``published_root`` (:mod:`impls.site.published`) get a
    section and ``published.html``.  Returns a summary.
    """
    from .. import report
    from . import published as site_published

    html_dir = Path(html_dir)
    index, asv_page = html_dir / "index.html", html_dir / ASV_PAGE
    if not asv_page.is_file() and not index.is_file():
        raise SiteError(f"{index} not found: run `asv publish` first")
    commits = commit_runs_dirs(runs_root)
    if runs is None:
        if not commits:  # checked before asv's page moves, so the site stays asv's alone
            raise NoRunsError(f"no commit folder with run records under {runs_root}")
        runs = commits[-1]
    if index.is_file() and FRONT_PAGE_MARKER not in index.read_text(encoding="utf-8"):
        os.replace(index, asv_page)
    runs = Path(runs)
    if not runs.is_dir():
        raise SiteError(f"runs directory {runs} does not exist")
    if previous is None:
        earlier = [c for c in commits if c.resolve() != runs.resolve()]
        previous = earlier[-1] if earlier else None
    commit = runs.name

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", report.RecordWarning)
        loaded = report.load_all([runs])
    plots_dir = Path(plots_root) / commit
    rel_plots = f"{REPORT_SUBDIR}/{commit}"
    copied = set(_copy_files(plots_dir, html_dir / rel_plots, ("*.png", "summary.csv", "summary.md")))
    asv = AsvIndex(html_dir)
    page = _Page()

    families = sorted(set(loaded.runs["family"]) | {r["family"] for r in loaded.refused}
                      | {r["family"] for r in loaded.interleaved} | {r["family"] for r in loaded.extra},
                      key=lambda f: (_FAMILY_ORDER.index(f) if f in _FAMILY_ORDER else len(_FAMILY_ORDER), f))
    multi = len(families) > 1

    def png(kind: str, family: str) -> str | None:
        name = f"{kind}-{family}.png" if multi else f"{kind}.png"
        return f"{rel_plots}/{name}" if name in copied else None

    sections = []
    for family in families:
        group = loaded.runs[loaded.runs["family"] == family].reset_index(drop=True)
        refused = [r for r in loaded.refused if r["family"] == family]
        parts = [f'<section class="family" id="family-{_esc(family)}"><h2>{_esc(family)}</h2>']
        noisy = int(sum(1 for v in group.get("load.noisy", []) if _bool(v)))
        parts.append(f'<p class="note">{len(group)} runs'
                     + (f', <span class="badge noisy">{noisy} noisy</span>' if noisy else "")
                     + (f', <span class="badge refused">{len(refused)} refused</span>' if refused else "") + "</p>")
        links = asv.family_links(family)
        if links:
            parts.append('<p class="links">asv history: ' + " · ".join(
                f'<a href="{_esc(h)}">{_esc(t)}</a>' for t, h in links) + "</p>")
        if not group.empty or refused:
            parts.append(_family_table(group, refused, asv, family))
        for record in (r for r in loaded.extra if r["family"] == family):
            o = record["overhead"]
            ci = o.get("ci95") or [float("nan")] * 2
            parts.append(f'<p class="note"><b>Harness overhead</b> of the training loop over a bare loop '
                         f'({_esc(record.get("label"))}, {_esc(record.get("rounds"))} interleaved rounds): '
                         f'<b>{o["value"]:+.2%}</b> [{ci[0]:+.2%}, {ci[1]:+.2%}]; {_esc(record.get("ci_method", ""))}</p>')
        for record in (r for r in loaded.interleaved if r["family"] == family):
            name = f"{report.interleaved_name(record)}.png"
            parts.append(_interleaved_block(record, page, f"{rel_plots}/{name}" if name in copied else None))
        if not group.empty:
            charts = []
            comparison = report.technique_comparison(group, [r for r in loaded.interleaved if r["family"] == family])
            if len(comparison) > 1:
                charts.append(page.chart(spec_technique_comparison(comparison, group), png=png("technique_comparison", family),
                                         caption="Speed: interleaved rounds (median, 95% CI), absent where the family has "
                                                 "no interleaved timing; loss: runs to the same FLOP budget. Hover for the record."))
            for spec in spec_loss_vs_flops(group):
                charts.append(page.chart(spec, png=png("loss_vs_flops", family),
                                         caption="Click a legend entry to highlight a run; hover a point for the record."))
            charts.append(page.chart(spec_throughput(group), png=png("throughput_memory", family),
                                     caption="Hover a bar for the recipe, step-time CI, MFU/HFU and load flag."))
            parts.append('<div class="charts">' + "".join(charts) + "</div>")
        parts.append("</section>")
        sections.append("".join(parts))

    data_parallel = data_parallel_section(loaded, page, copied, rel_plots)
    if data_parallel:
        sections.append(data_parallel)
    compression = compression_section(loaded, copied, rel_plots)
    if compression:
        sections.append(compression)
    tokens = tokens_section(loaded, copied, rel_plots)
    if tokens:
        sections.append(tokens)
    iso_dirs = sorted(p for p in Path(isoflop_root).glob(f"{commit}-*") if p.is_dir()) if Path(isoflop_root).is_dir() else []
    for iso_dir in iso_dirs:
        sections.append(_isoflop_section(iso_dir, html_dir, page, asv))
    published = site_published.build(html_dir, published_root, commit=commit, runs_dir=runs, loaded=loaded,
                                     plots_dir=plots_dir)
    sections += [published.section] if published else []

    compare_line = ""
    summary = [f"front page: {len(families)} families, {len(loaded.runs)} runs, {len(loaded.refused)} refused, "
               f"{len(loaded.interleaved)} interleaved comparisons, {len(iso_dirs)} isoFLOP sweeps from {runs}"]
    if previous is not None and Path(previous).is_dir():
        table = report.compare_table(Path(previous), runs)
        nav = f'<p><a href="index.html">← etbench results</a> · <a href="{ASV_PAGE}#/regressions">asv regressions</a></p>'
        (html_dir / "compare.html").write_text(report.compare_html(table, Path(previous).name, commit, nav=nav),
                                               encoding="utf-8")
        (html_dir / "compare.csv").write_text(table.to_csv(index=False), encoding="utf-8")
        counts = ", ".join(f"{n} {k}" for k, n in sorted(report.verdict_counts(table).items()))
        compare_line = (f' · <a href="compare.html">compare with {_esc(Path(previous).name)}</a> '
                        f'<span class="meta">({_esc(counts)})</span>')
        summary.append(f"compare.html: {commit} vs {Path(previous).name} ({counts})")
    summary += [published.summary] if published else []

    devices = sorted({report.describe_device(k, n) or "?" for k, n in
                      zip(loaded.runs.get("device.type", []), loaded.runs.get("device.name", []))})
    noisy_total = int(sum(1 for v in loaded.runs.get("load.noisy", []) if _bool(v)))
    downloads = " · ".join(f'<a href="{rel_plots}/{n}">{n}</a>' for n in ("summary.csv", "summary.md") if n in copied)
    nav = "".join(f'<a href="#family-{_esc(f)}">{_esc(f)}</a>' for f in families)
    nav += '<a href="#data-parallel">data-parallel</a>' if data_parallel else ""
    nav += '<a href="#compression">compression</a>' if compression else ""
    nav += '<a href="#tokens">data &amp; tokens</a>' if tokens else ""
    nav += "".join(f'<a href="#isoflop-{_esc(d.name)}">isoFLOP {_esc(d.name)}</a>' for d in iso_dirs)
    nav += published.nav if published else ""
    scripts = "".join(f'<script src="{url}"></script>' for url in REPORT_CDN_ASSETS)
    specs_json = json.dumps(_json_safe(page.specs), separators=(",", ":")).replace("</", "<\\/")
    document = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">{FRONT_PAGE_MARKER}
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>etbench results: {_esc(commit)}</title>
<link rel="icon" href="swallow.ico">
<style>{PAGE_CSS}{report.TABLE_CSS}</style>
{scripts}
</head><body>
<header><h1>etbench results · commit {_esc(commit)}</h1>
<div class="meta">{_esc(", ".join(devices))} · {len(loaded.runs)} runs in {len(families)} families ·
{'<span class="badge noisy">' + str(noisy_total) + ' noisy</span>' if noisy_total else '<span class="badge quiet">no run flagged noisy</span>'}
{f' · <span class="badge refused">{len(loaded.refused)} refused</span>' if loaded.refused else ''}</div>
{_peak_paragraph(plots_dir)}
<div class="meta"><a href="{ASV_PAGE}">asv: per-benchmark history</a> · <a href="{ASV_PAGE}#/regressions">asv: regressions</a>{compare_line}{' · downloads: ' + downloads if downloads else ''}</div>
</header>
<div id="vega-missing">The plotting library did not load: the interactive charts are missing (static PNGs are linked under each).</div>
<nav class="families">{nav}</nav>
<main>
<p class="note">Every table sorts by a click on its header. s/step is the median of the timed steps with a
bootstrap 95% interval where the record has one; <b>noisy</b> rows were measured while the 1-min load exceeded the
cores in use; <b>refused</b> records failed the consistency check (e.g. MFU above 100%) and are not plotted.
Run names link to asv's history graph of their benchmark.</p>
{''.join(sections)}
</main>
<script type="application/json" id="etbench-specs">{specs_json}</script>
<script>{report.SORTABLE_JS}</script>
<script>{_EMBED_JS}</script>
</body></html>
"""
    index.write_text(document, encoding="utf-8")
    summary.insert(1, f"{len(page.specs)} interactive charts; asv's page moved to {ASV_PAGE}")
    return summary


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


def check_front_page(dom: str, source: str) -> str:
    """Check the rendered DOM of etbench's front page (``source``: the page as published): every
    chart of its spec block was drawn by vega-embed as SVG, none failed, the plotting library
    loaded, the tables are sortable and nothing points at another host.  Returns a summary."""
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
               f"sorted benchmark list on {asv_page}, no external resources"]
    if has_front:
        summary.append(check_front_page(front_dom, front_source))
    for shot in (screenshot, asv_screenshot):
        if shot:
            summary.append(f"screenshot: {shot}")
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

    p_build = sub.add_parser("build", help="make etbench's report the front page (asv's index moves to asv.html)")
    p_build.add_argument("html_dir", type=Path)
    p_build.add_argument("--runs-root", type=Path, default=Path("results/runs"),
                         help="folder of per-commit runs directories (default: results/runs)")
    p_build.add_argument("--plots-root", type=Path, default=Path("results/plots"),
                         help="folder of per-commit report outputs (default: results/plots)")
    p_build.add_argument("--isoflop-root", type=Path, default=Path("results/isoflop"),
                         help="folder of isoFLOP sweeps, <commit>-<profile>/ (default: results/isoflop)")
    p_build.add_argument("--runs", type=Path, help="runs directory shown (default: the newest under --runs-root)")
    p_build.add_argument("--published-root", type=Path, default=Path("results/published"),
                         help="other machines' records (python -m impls.publish), shown beside this run; "
                              "absent: no such section (default: results/published)")
    p_build.add_argument("--previous", type=Path,
                         help="runs directory compared against (default: the one before --runs)")

    p_check = sub.add_parser("check", help="render the site in headless chromium and verify it")
    p_check.add_argument("html_dir", type=Path)
    p_check.add_argument("--screenshot", type=Path, help="also save a PNG of the page")
    p_check.add_argument("--page", default="", help="asv route for asv's screenshot, e.g. '#mod.time_x'")
    p_check.add_argument("--asv-screenshot", type=Path, help="also save a PNG of asv's page")
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
        elif args.command == "build":
            for flag, path in (("--runs", args.runs), ("--previous", args.previous)):
                if path is not None and not path.is_dir():
                    print(f"error: {flag} {str(path)!r} is not a directory", file=sys.stderr)
                    return 2
            try:
                lines = build_front_page(args.html_dir, args.runs_root, args.plots_root, args.isoflop_root,
                                         args.runs, args.previous, args.published_root)
            except NoRunsError as err:
                lines = [f"{err}: the front page stays asv's (run `make bench` for etbench's report)"]
            for line in lines:
                print(f"site: {line}")
        else:
            for line in check_site(args.html_dir, args.screenshot, args.chromium, args.page, args.asv_screenshot):
                print(f"site ok: {line}")
    except SiteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0

