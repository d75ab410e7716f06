"""Scanning published HTML: start tags with their exact spans, and the resources a page would
fetch from another host (shared by :mod:`.vendor` and :mod:`.check`)."""
from __future__ import annotations

import html
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator, Sequence

VENDOR_SUBDIR = "vendor"

# Elements/attributes whose URL the browser fetches while rendering.  Plain
# ``<a href>`` links (asv's GitHub link, the project URL) are navigation, not
# resources, so they may point anywhere.
RESOURCE_ATTRS = {
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


class TagCollector(HTMLParser):
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
    return TagCollector(text).tags


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
        for attr in RESOURCE_ATTRS.get(tag.name, ()):
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


def render_tag(tag: Tag) -> str:
    parts = [tag.name]
    for key, value in tag.attrs:
        parts.append(key if value is None else f'{key}="{html.escape(value, quote=True)}"')
    return "<" + " ".join(parts) + (" />" if tag.self_closing else ">")



def html_files(html_dir: Path) -> Iterator[Path]:
    """The site's HTML pages, the vendored packages' own files left out."""
    vendor_dir = html_dir / VENDOR_SUBDIR
    for path in sorted(html_dir.rglob("*.html")):
        if vendor_dir not in path.parents:
            yield path
