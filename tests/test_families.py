"""The families table (impls/families.py) is the one definition of every benchmark family and record
kind: every asv class of benchmarks/bench_*.py and every record kind a writer emits must have an entry,
and every entry must name classes that exist."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from impls import families

ROOT = Path(__file__).resolve().parents[1]


def _asv_classes() -> set[str]:
    """``bench_x.Class`` for every class asv discovers in benchmarks/bench_*.py: a public class of
    the module (not imported into it) with a benchmark attribute (time_/track_/peakmem_/mem_),
    inherited or assigned."""
    import importlib
    import inspect

    found = set()
    for path in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        module = importlib.import_module(f"benchmarks.{path.stem}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and not name.startswith("_") and any(
                    a.startswith(("time_", "track_", "peakmem_", "mem_")) for a in dir(cls)):
                found.add(f"{path.stem}.{name}")
    return found


def test_every_asv_class_has_a_family():
    missing = sorted(_asv_classes() - families.asv_classes())
    assert not missing, f"asv classes without a family in impls/families.py: {missing}"


def test_every_family_class_exists():
    stale = sorted(families.asv_classes() - _asv_classes())
    assert not stale, f"impls/families.py names asv classes that do not exist: {stale}"


def test_names_unique_and_patterns_compile():
    assert len(set(families.NAMES)) == len(families.FAMILIES)
    for family in families.FAMILIES:
        assert family.title and family.question, family.name
        if family.stem:
            assert re.compile(family.stem).groups >= 1


def _written_kinds() -> set[str]:
    """Every ``kind`` a record writer under impls/ sets: literal strings and the families constants
    used as ``kind=...`` in a dict() call or as the ``"kind"`` key of a dict literal."""
    kinds = set()
    writers = [ROOT / "impls" / name for name in ("compare.py", "commbench.py", "train.py", "isoflop.py")]
    writers += sorted((ROOT / "impls" / "measure").glob("*.py"))
    for path in writers:
        for node in ast.walk(ast.parse(path.read_text())):
            values = []
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict":
                values = [k.value for k in node.keywords if k.arg == "kind"]
            elif isinstance(node, ast.Dict):
                values = [v for k, v in zip(node.keys, node.values)
                          if isinstance(k, ast.Constant) and k.value == "kind"]
            for value in values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    kinds.add(value.value)
                elif isinstance(value, ast.Attribute) and getattr(value.value, "id", None) == "families":
                    kinds.add(getattr(families, value.attr))
                elif isinstance(value, ast.Name) and value.id == "KIND":
                    kinds.add(families.DATA_COMPRESSION)
    return kinds


def test_every_record_kind_written_is_known():
    kinds = _written_kinds()
    # train.py's peak "kind" is the memory meter's name (allocator/rss), not a record kind.
    assert {families.INTERLEAVED, families.HARNESS_OVERHEAD, families.COMM, families.SPARSE_STORAGE,
            families.DATA_COMPRESSION} <= kinds
    unknown = sorted(k for k in kinds - set(families.RECORD_KINDS) if k not in ("allocator", "rss"))
    assert not unknown, f"record kinds without an entry in families.RECORD_KINDS: {unknown}"


def test_every_recorded_family_folder_is_known(tmp_path):
    """The family folders the last quick bench wrote (when this checkout has them) are all known."""
    runs = sorted((ROOT / "results" / "runs").glob("*/"))
    folders = {p.name for r in runs for p in r.iterdir() if p.is_dir()}
    unknown = sorted(folders - set(families.NAMES))
    assert not unknown, f"record folders with no family: {unknown}"


def test_helpers():
    assert families.of_section("tokens") == ("seqlen", "distill", "mae", "ltd", "tokendrop")
    assert families.order_key("baseline") < families.order_key("technique") < families.order_key("zzz")
    assert families.title("nope") == "nope"
    with pytest.raises(ValueError, match="unknown section"):
        families.of_section("nope")
    with pytest.raises(ValueError, match="section 'x' is not one of"):
        families.Family("a", "A", (), section="x")
