"""The import rules of the guide, read from the source (as ``tests/test_build.py`` reads the
no-patching rule): nothing under ``impls/`` imports the CLI, and no module reaches into another
module's ``_private`` names (imported by name, or as ``module._name`` through an imported module).
A private *module* of a package (``impls/techniques/_pruning.py``) is shared by its package's
modules and is not a private name of another module.
"""
from __future__ import annotations

import ast
from pathlib import Path

IMPLS = Path(__file__).resolve().parents[1] / "impls"


def _modules():
    for path in sorted(IMPLS.rglob("*.py")):
        parts = list(path.relative_to(IMPLS.parent).with_suffix("").parts)
        package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield path, name, package if parts[-1] != "__init__" else parts[:-1]


def _resolve(node: ast.ImportFrom, package: list[str]) -> str:
    if not node.level:
        return node.module or ""
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _violations():
    cli, private = [], []
    for path, name, package in _modules():
        tree = ast.parse(path.read_text())
        aliases = {}  # local name -> impls module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "impls":
                        aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "impls"
                        if a.name == "impls.cli":
                            cli.append((name, a.name))
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(node, package)
                if source.split(".")[0] != "impls":
                    continue
                for a in node.names:
                    target = f"{source}.{a.name}"
                    if source == "impls.cli" or target == "impls.cli":
                        cli.append((name, target))
                    is_module = (IMPLS.parent / Path(*target.split("."))).with_suffix(".py").exists() or \
                        (IMPLS.parent / Path(*target.split("."))).is_dir()
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        own_package = is_module and source == ".".join(package)
                        if not own_package:
                            private.append((name, target))
                    if is_module:
                        aliases[a.asname or a.name] = target
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                target = aliases[node.value.id]
                if target != name:
                    private.append((name, f"{target}.{node.attr}"))
    return cli, private


def test_nothing_imports_the_cli():
    cli, _ = _violations()
    assert [c for c in cli if c[0] != "impls.cli"] == []


def test_no_module_uses_another_modules_private_names():
    _, private = _violations()
    assert private == []
