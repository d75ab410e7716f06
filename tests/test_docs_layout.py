"""The README's layout section names every module of impls/ (techniques are documented one per row
in the README's technique tables and impls/techniques/README.md)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _layout() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Layout\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_layout_names_every_module():
    layout = _layout()
    missing = []
    for path in sorted((ROOT / "impls").rglob("*.py")):
        rel = path.relative_to(ROOT / "impls")
        if rel.parts[0] == "techniques" or path.name in ("__init__.py", "__main__.py"):
            continue
        if path.name not in layout:
            missing.append(str(rel))
    assert not missing, f"modules missing from the README's layout section: {missing}"


def test_every_technique_is_documented():
    """Every technique's CLI name (its ``NAME``) appears in the README (its family's table)."""
    import re

    docs = (ROOT / "README.md").read_text()
    missing = []
    for path in sorted((ROOT / "impls" / "techniques").glob("*.py")):
        found = re.search(r'^NAME = "([^"]+)"', path.read_text(), flags=re.M)
        if found and not re.search(rf"\b{re.escape(found.group(1))}\b", docs):
            missing.append(found.group(1))
    assert not missing, f"techniques the README never names: {missing}"
