"""Every data-parallel technique's measured traffic per step against the formula of the
collectives it declares (``StepPlan.sharding_stage``, ``comm_stage``, ``comm_param_bytes``), through
an interleaved comparison on 2 gloo ranks: DDP 2Ψ, FSDP2 3Ψ, FSDP2 keeping the gathered
parameters 2Ψ, FSDP2 with bf16 all-gathers 2Ψ·2 + Ψ·4 bytes -- each × (n−1)/n."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

SPEC = {"baseline": "ddp", "rounds": 2, "steps": 1, "warmup": 2,
        "common": {"model": "nano", "batch_size": 4, "seq_len": 64, "data": "synthetic", "lr": 0.001},
        "variants": {"ddp": {}, "fsdp": {"techniques": ["fsdp"]},
                     "fsdp-keep": {"techniques": ["fsdp:reshard_after_forward=false"]},
                     "fsdp-bf16": {"techniques": ["fsdp:mp=bf16"]}}}


def test_measured_traffic_matches_each_techniques_formula(tmp_path):
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps(SPEC))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "impls.cli", "compare", str(spec), "--nproc", "2", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    variants = json.loads(out.read_text())["variants"]
    stages = {name: v["comm"]["formula_stage"] for name, v in variants.items()}
    assert stages == {"ddp": 0, "fsdp": 3, "fsdp-keep": 2, "fsdp-bf16": 3}
    psi = variants["ddp"]["model_states"]["psi"]
    payload = {name: v["comm"]["payload_bytes"] for name, v in variants.items()}
    # what each step hands to the collectives (+ the engine's 8-byte target count)
    assert payload["fsdp"]["all_gather"] == 2 * 4 * psi and payload["fsdp"]["reduce_scatter"] == 4 * psi
    assert payload["fsdp-keep"]["all_gather"] == 4 * psi
    assert payload["fsdp-bf16"]["all_gather"] == 2 * 2 * psi and payload["fsdp-bf16"]["reduce_scatter"] == 4 * psi
    for name, v in variants.items():
        assert v["comm"]["ratio"] == pytest.approx(1.0, abs=1e-3), (name, v["comm"])
