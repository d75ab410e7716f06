"""``impls/techniques/README.md`` documents every name the technique registry reads from a
technique module (``Technique.of`` in ``impls/techniques/__init__.py``: ``module.X`` and
``ns.get("X", ...)``), read from the source so a new hook cannot go undocumented."""
from __future__ import annotations

import ast
from pathlib import Path

TECHNIQUES = Path(__file__).resolve().parents[1] / "impls" / "techniques"


def registry_reads() -> set[str]:
    tree = ast.parse((TECHNIQUES / "__init__.py").read_text())
    of = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "of")
    names = set()
    for node in ast.walk(of):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "ns"):
            names.add(node.args[0].value)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "module" \
                and node.attr.isupper():
            names.add(node.attr)
    return names


def test_readme_documents_every_hook_the_registry_reads():
    names = registry_reads()
    assert {"NAME", "STAGE", "OPTIONS", "check_recipe", "REQUIRES", "DATA_PARALLEL"} <= names
    readme = (TECHNIQUES / "README.md").read_text()
    undocumented = sorted(n for n in names if f"`{n}`" not in readme and f"`{n}(" not in readme)
    assert undocumented == [], f"read by the registry, not in impls/techniques/README.md: {undocumented}"
