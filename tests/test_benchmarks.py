"""The asv suites are well-formed: every registered recipe is valid, and asv discovers them."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from impls import techniques, train

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # fairscale installs a top-level `benchmarks` package: ours first
for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
    del sys.modules[name]
bench_techniques = importlib.import_module("benchmarks.bench_techniques")


@pytest.mark.parametrize("variant", list(bench_techniques.VARIANTS))
def test_every_registered_technique_variant_is_a_valid_recipe(variant):
    specs, overrides = bench_techniques.VARIANTS[variant]
    recipe = train.Recipe(**bench_techniques._recipe(**overrides), techniques=specs,
                          flops_budget=bench_techniques.SETTINGS["flops_budget"])
    train.validate(recipe)  # raises ConfigError naming the problem
    for spec in specs:
        assert spec.split(":")[0] in techniques.REGISTRY


def test_asv_discovers_every_suite(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "asv", "check", "--python=same", "--config",
                           str(REPO / "asv.conf.json")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Error" not in proc.stdout
