"""Build the published site (etbench's report as the front page, asv's pages alongside), make it work offline, and check that it renders.

asv 0.6's ``index.html`` loads jQuery, flot, bootstrap and three small jQuery
plugins from public CDNs, so ``results/html`` shows nothing but asv's
"failed to load" page on a machine without internet access.  This package

* ``vendor`` (:mod:`.vendor`): rewrites every CDN ``<script src>`` /
  ``<link href>`` in the published HTML to a local copy under
  ``<html_dir>/vendor/``, taking the files from npm registry packages
  (``npm pack``) that are downloaded once into a cache directory and verified
  against pinned tarball hashes; and
* ``build`` (:mod:`.front`): makes etbench's own report the site's front page
  (asv's index moves to ``asv.html``): one section per report section of
  :data:`impls.families.SECTIONS` (:mod:`.sections`: the families' sortable
  tables, interleaved comparisons and run charts, data-parallel, model-parallel,
  at scale (the cached dry-run sweep and planner calibration of ``results/atscale/``),
  compression, token efficiency, the isoFLOP sweeps) with interactive
  Vega-Lite plots (vega-embed, vendored like asv's scripts) and the report's
  PNGs, a navigation bar, headings and links into asv's per-benchmark graphs
  (:mod:`.asv_links`) all read from :mod:`impls.families`, other machines'
  publications (:mod:`.published`), and ``compare.html`` against the previous
  commit; and
* ``check`` (:mod:`.check`): opens the site in headless Chromium, served from a
  localhost HTTP server with all other host names made unresolvable, and
  verifies that asv's JavaScript really ran (benchmark names and flot plots in
  the DOM), that every front-page chart was drawn as SVG, and that no element
  still points at an external host.

Shared pieces: :mod:`.page` (file names, CSS/JS, escaping, strict JSON, the
chart collector), :mod:`.htmlscan` (tags and external resources),
:mod:`.specs` (the run charts' Vega-Lite specs), :mod:`.errors`.

Command line::

    python -m impls.site build results/html [--runs-root results/runs] [--runs DIR] [--previous DIR]
    python -m impls.site vendor results/html [--cache .cache/site-vendor]
    python -m impls.site check results/html [--screenshot results/site.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .asv_links import AsvIndex
from .check import check_front_page, check_site, find_chromium, run_chromium, serve_directory
from .errors import FetchError, NoRunsError, SiteError
from .front import build_front_page, commit_runs_dirs
from .htmlscan import Tag, external_resources, is_external, parse_tags
from .page import ASV_PAGE, FRONT_PAGE_MARKER, PAGE_CSS, REPORT_SUBDIR, VEGA_LITE_SCHEMA, Page, json_safe
from .sections import SECTIONS, SectionContext, SiteSection, compression_section, data_parallel_section, tokens_section
from .specs import spec_interleaved, spec_loss_vs_flops, spec_technique_comparison, spec_throughput
from .vendor import (ASV_CDN_ASSETS, CDN_ASSETS, DEFAULT_CACHE_DIR, PACKAGE_INTEGRITY, REPORT_CDN_ASSETS, VEGA,
                     VEGA_EMBED, VEGA_LITE, VENDOR_SUBDIR, Asset, fetch_package, sri, vendor_offline)

__all__ = [
    "ASV_CDN_ASSETS", "ASV_PAGE", "AsvIndex", "Asset", "CDN_ASSETS", "DEFAULT_CACHE_DIR", "FRONT_PAGE_MARKER",
    "FetchError", "NoRunsError", "PACKAGE_INTEGRITY", "PAGE_CSS", "Page", "REPORT_CDN_ASSETS", "REPORT_SUBDIR",
    "SECTIONS", "SectionContext", "SiteError", "SiteSection", "Tag", "VEGA", "VEGA_EMBED", "VEGA_LITE",
    "VEGA_LITE_SCHEMA", "VENDOR_SUBDIR", "build_front_page", "check_front_page", "check_site", "commit_runs_dirs",
    "compression_section", "data_parallel_section", "external_resources", "fetch_package", "find_chromium",
    "is_external", "json_safe", "main", "parse_tags", "run_chromium", "serve_directory", "spec_interleaved",
    "spec_loss_vs_flops", "spec_technique_comparison", "spec_throughput", "sri", "tokens_section",
    "vendor_offline",
]


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m impls.site``."""
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

    return parser


def vendor_command(args) -> int:
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
    return 0


def build_command(args) -> int:
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
    return 0


def check_command(args) -> int:
    for line in check_site(args.html_dir, args.screenshot, args.chromium, args.page, args.asv_screenshot):
        print(f"site ok: {line}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m impls.site {vendor,build,check} HTML_DIR ...``; returns the exit status."""
    args = build_parser().parse_args(argv)
    command = {"vendor": vendor_command, "build": build_command, "check": check_command}[args.command]
    try:
        return command(args)
    except SiteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
