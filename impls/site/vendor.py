"""Vendoring: every CDN ``<script src>`` / ``<link href>`` of the published HTML is rewritten to a
local copy under ``<html_dir>/vendor/``, taken from npm registry packages (``npm pack``) that are
downloaded once into a cache directory and verified against pinned tarball hashes."""
from __future__ import annotations

import base64
import hashlib
import os
import posixpath
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import FetchError, SiteError
from .htmlscan import VENDOR_SUBDIR, Tag, external_resources, html_files, is_external, parse_tags, render_tag

DEFAULT_CACHE_DIR = Path(".cache") / "site-vendor"


# Attributes that only make sense for the CDN copy: ``integrity`` describes the
# CDN's bytes (our unminified flot differs) and ``crossorigin`` turns the load
# into a CORS request, which Chromium refuses for pages opened from file://.
CDN_ONLY_ATTRS = frozenset({"integrity", "crossorigin", "referrerpolicy"})


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



def sri(data: bytes, algorithm: str) -> str:
    """Subresource-Integrity string (``sha256-<base64>``) of ``data``."""
    return f"{algorithm}-" + base64.b64encode(hashlib.new(algorithm, data).digest()).decode()


def sri_matches(data: bytes, integrity: str) -> bool:
    """Whether ``data`` satisfies an SRI attribute (any of its listed hashes)."""
    for token in integrity.split():
        algorithm = token.split("-", 1)[0]
        if algorithm in ("sha256", "sha384", "sha512") and sri(data, algorithm) == token:
            return True
    return False


def tarball_name(spec: str) -> str:
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
    cached = cache_dir / tarball_name(spec)
    if cached.is_file() and sri_matches(cached.read_bytes(), expected):
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
        fetched = Path(tmp) / tarball_name(spec)
        if proc.returncode != 0 or not fetched.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise FetchError(f"npm pack {spec} failed (registry unreachable?): {last}")
        if not sri_matches(fetched.read_bytes(), expected):
            raise SiteError(f"npm tarball of {spec} does not match its pinned sha512")
        os.replace(fetched, cached)  # atomic: a half-written cache file never appears
    return cached


def package_files(tarball: Path) -> dict[str, bytes]:
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



def find_cdn_tags(html_dir: Path) -> tuple[list[tuple[Path, str, list[tuple[Tag, str]]]], dict[str, str], set[str]]:
    """Pass 1 of :func:`vendor_offline`: every page's CDN script/stylesheet tags (page, text,
    [(tag, url)]), the ``integrity`` hash each URL was given, and the URLs whose local copies the
    pages already reference (an earlier run), so re-running restores a deleted or damaged copy."""
    local_to_url = {asset.local_path: url for url, asset in CDN_ASSETS.items()}
    pages: list[tuple[Path, str, list[tuple[Tag, str]]]] = []
    integrity: dict[str, str] = {}
    needed: set[str] = set()
    for page in html_files(html_dir):
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
                    "(add it to impls.site.vendor.CDN_ASSETS)"
                )
            if tag.get("integrity"):
                integrity[url] = tag.get("integrity")
            hits.append((tag, url))
        left = external_resources(others)
        if left:  # e.g. an external <img>: no package to take it from
            raise SiteError(f"{page.relative_to(html_dir)}: no local counterpart for {left[0]}")
        if hits:
            pages.append((page, text, hits))
    return pages, integrity, needed


def copy_assets(html_dir: Path, urls: list[str], integrity: dict[str, str], cache_dir: Path) -> None:
    """Pass 2 of :func:`vendor_offline`: materialise the files of ``urls`` under ``vendor/`` (one
    tarball per package), exact ones checked against the page's integrity hash."""
    by_package: dict[str, list[str]] = {}
    for url in urls:
        by_package.setdefault(CDN_ASSETS[url].package, []).append(url)
    for spec, pkg_urls in by_package.items():
        files = package_files(fetch_package(spec, cache_dir))
        for url in pkg_urls:
            asset = CDN_ASSETS[url]
            if asset.member not in files:
                raise SiteError(f"{spec} has no file {asset.member} (needed for {url})")
            data = files[asset.member]
            if asset.exact and url in integrity and not sri_matches(data, integrity[url]):
                raise SiteError(f"{spec}/{asset.member} does not match the integrity hash of {url}")
            wanted = {asset.member: data}
            for folder in asset.companions:
                wanted.update({m: b for m, b in files.items() if m.startswith(folder)})
            for member, blob in wanted.items():
                target = html_dir / VENDOR_SUBDIR / asset.local_dir / member
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(blob)


def rewrite_tags(html_dir: Path, page: Path, text: str, hits: list[tuple[Tag, str]]) -> None:
    """Pass 3 of :func:`vendor_offline`: point the page's CDN tags at the local copies, last first
    so earlier offsets stay valid, dropping the CDN-only attributes."""
    for tag, url in sorted(hits, key=lambda hit: hit[0].start, reverse=True):
        attr = "src" if tag.name == "script" else "href"
        local = posixpath.relpath(CDN_ASSETS[url].local_path, page.parent.relative_to(html_dir).as_posix())
        tag.attrs = [(k, local if k == attr else v) for k, v in tag.attrs if k not in CDN_ONLY_ATTRS]
        text = text[:tag.start] + render_tag(tag) + text[tag.end:]
    page.write_text(text, encoding="utf-8")


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

    pages, integrity, needed = find_cdn_tags(html_dir)
    urls = sorted(needed | {url for _, _, hits in pages for _, url in hits})
    copy_assets(html_dir, urls, integrity, cache_dir)
    for page, text, hits in pages:
        rewrite_tags(html_dir, page, text, hits)
    return [CDN_ASSETS[url].local_path for url in urls]
