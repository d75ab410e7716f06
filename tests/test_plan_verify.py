"""``etbench plan --verify K`` (:mod:`impls.plan_verify`): planner layouts as etbench recipes, the
top K dry-run, measured bytes beside predicted, refusals recorded, bad input refused."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from impls import plan_verify, planner, techniques, train
from impls.errors import ConfigError
from impls.planner import GIB, Hardware, Layout

ROOT = Path(__file__).resolve().parents[1]
L = Layout


@pytest.mark.parametrize("layout,impl,precision,techs,mesh,batch", [
    (L(1, 1, 1, 0, "none", 1, 8, 1, False), "default", "fp32", [], {}, 8),
    (L(4, 1, 1, 0, "none", 1, 2, 1, False), "default", "fp32", [], {}, 2),  # ddp: the default at dp > 1
    (L(2, 1, 1, 1, "none", 1, 4, 1, False), "default", "fp32", ["zero:stage=1"], {}, 4),
    (L(2, 1, 1, 2, "none", 1, 4, 1, False), "default", "fp32", ["zero:stage=2"], {}, 4),
    (L(2, 1, 1, 3, "none", 1, 4, 1, False), "default", "fp32", ["fsdp"], {}, 4),
    (L(2, 1, 1, 1, "none", 1, 4, 1, False), "native", "fp32", ["zero-redundancy"], {}, 4),
    (L(2, 1, 1, 2, "none", 1, 4, 1, False), "native", "fp32", ["oss"], {}, 4),
    (L(2, 1, 1, 3, "none", 1, 4, 1, False), "deepspeed", "fp32", ["zero:stage=3"], {}, 4),
    (L(1, 1, 1, 3, "none", 1, 8, 1, False), "default", "fp32", [], {}, 8),  # dp = 1: nothing to shard
    (L(1, 2, 1, 0, "none", 1, 8, 1, False), "default", "fp32", ["tp"], {"tp": 2}, 8),
    (L(1, 2, 1, 0, "none", 1, 8, 1, False, True), "default", "fp32", ["tp:sp=true"], {"tp": 2}, 8),
    (L(1, 1, 2, 0, "1f1b", 1, 2, 4, False), "default", "fp32", ["pp:schedule=1f1b,microbatches=4"], {"pp": 2}, 8),
    (L(1, 1, 2, 0, "interleaved", 2, 1, 4, False), "default", "fp32",
     ["pp:schedule=interleaved,microbatches=4,chunks=2"], {"pp": 2}, 4),
    (L(2, 1, 1, 0, "none", 1, 2, 4, False), "default", "fp32", ["grad_accum:steps=4"], {}, 2),
    (L(2, 2, 1, 3, "none", 1, 4, 1, True), "default", "fp32", ["fsdp", "tp", "checkpoint"], {"tp": 2}, 4),
    (L(2, 1, 1, 0, "none", 1, 4, 1, False), "default", "mixed", ["bf16"], {}, 4),
    (L(2, 1, 1, 3, "none", 1, 4, 1, False), "default", "mixed", ["fsdp:mp=bf16"], {}, 4),
    (L(2, 1, 1, 2, "none", 1, 4, 1, False), "default", "mixed", ["bf16", "zero:stage=2"], {}, 4),
])
def test_layout_to_recipe(layout, impl, precision, techs, mesh, batch):
    recipe, notes = plan_verify.layout_recipe(layout, "micro", 64, precision=precision, impl=impl)
    assert recipe.techniques == techs and recipe.mesh == mesh and recipe.batch_size == batch
    assert recipe.model == "micro" and recipe.seq_len == 64 and recipe.device == "cpu"
    assert recipe.data == "synthetic:vocab=256,order=1"  # the model keeps its own vocabulary
    for spec in recipe.techniques:
        techniques.parse(spec)  # every technique and option is etbench's
    if precision == "mixed":
        assert notes and ("2 + 2 + 12" in notes[0])
    if impl == "deepspeed" or (precision == "fp32" and any(t.startswith("zero:") for t in techs)):
        assert any("fp32 master partition" in n for n in notes)


@pytest.mark.parametrize("layout", [L(2, 1, 1, 0, "none", 1, 4, 1, False), L(2, 1, 1, 3, "none", 1, 4, 1, False),
                                    L(1, 2, 1, 0, "none", 1, 8, 1, False, True),
                                    L(1, 1, 2, 0, "gpipe", 1, 2, 4, True), L(2, 1, 1, 0, "none", 1, 2, 4, False)])
def test_mapped_recipes_pass_etbench_checks(layout):
    """The recipes are ones etbench validates at the layout's world size (every global batch
    dp·b·m the planner assumes)."""
    recipe, _ = plan_verify.layout_recipe(layout, "micro", 64)
    world = layout.dp * layout.tp * layout.pp
    checked = train.validate(recipe, world_size=world)
    assert checked.dims.dp == layout.dp and checked.dims["tp"] == layout.tp and checked.dims["pp"] == layout.pp
    assert recipe.batch_size * checked.plan.accum_steps * checked.dims.dp == layout.dp * layout.micro_batch_size \
        * layout.micro_batches


def test_bad_mapping_inputs_are_one_line():
    with pytest.raises(ConfigError, match="implementation 'magic'.*valid: default, deepspeed, native"):
        plan_verify.layout_recipe(L(2, 1, 1, 1, "none", 1, 4, 1, False), "micro", 64, impl="magic")
    with pytest.raises(ConfigError, match="precision 'fp64'.*valid: mixed, fp32"):
        plan_verify.layout_recipe(L(2, 1, 1, 1, "none", 1, 4, 1, False), "micro", 64, precision="fp64")


def _plan(layouts, devices=2, precision="fp32"):
    hw = Hardware(devices, 1 * GIB, 1e11, 10.0, 10.0, 0.4)
    return planner.plan("micro", hw, seq_len=64, global_batch=8, precision=precision, layouts=layouts)


def test_refused_and_failed_dry_runs_are_recorded(monkeypatch):
    """A layout etbench or the dry run refuses is 'not verified' with the one-line reason; a dry
    run that breaks is 'failed' with the error; neither stops the other rows."""
    zero_pp = L(2, 1, 2, 1, "gpipe", 1, 1, 4, False)  # ZeRO-1 with a pipeline: refused
    result = _plan([zero_pp], devices=4)
    rows = plan_verify.verify(result, 1)
    assert len(rows) == 1 and rows[0]["status"] == "not verified" and "measured" not in rows[0]
    assert rows[0]["reason"] and "\n" not in rows[0]["reason"]
    assert rows[0]["plan_rank"] == 1 and rows[0]["label"] == zero_pp.label

    from impls import dryrun

    def broken(recipe, world_size, rank=0):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(dryrun, "dry_run", broken)
    rows = plan_verify.verify(_plan([L(2, 1, 1, 3, "none", 1, 4, 1, False)]), 5)
    assert [r["status"] for r in rows] == ["failed"] and rows[0]["reason"] == "RuntimeError: boom"
    text = plan_verify.table(rows)
    assert "failed: RuntimeError: boom" in text
    with pytest.raises(ConfigError, match="--verify -1"):
        plan_verify.verify(result, -1)


def test_verify_rows_compare_rank0_with_the_stage0_formulas(monkeypatch):
    """Predicted numbers are the planner's for rank 0, traffic recovered from its times; the
    ratios are measured / predicted."""
    from impls import dryrun

    layout = L(2, 1, 1, 3, "none", 1, 4, 1, False)
    result = _plan([layout])
    pred = result.ranked[0]
    counts = planner.model_counts("micro")
    states = planner.model_state_bytes(planner.stage_tensors(counts, 1, 1, 0), 2, 3, planner.PRECISIONS["fp32"])

    def fake(recipe, world_size, rank=0):
        assert recipe.techniques == ["fsdp"] and world_size == 2 and rank == 0
        return dict(memory=dict(params_bytes=states["params"], grads_bytes=2 * states["grads"],
                                optimizer_bytes=states["optimizer"]),
                    comm=dict(bytes_per_step=3.0, traffic_bytes_by_op={"all_gather": 3.0}),
                    activation_bytes=None, wall_seconds=0.5, params=counts.psi, precision="fp32")

    monkeypatch.setattr(dryrun, "dry_run", fake)
    (row,) = plan_verify.verify(result, 1)
    assert row["status"] == "verified"
    assert row["ratio"]["params"] == 1.0 and row["ratio"]["grads"] == 2.0 and row["ratio"]["activations"] is None
    dp_bytes = pred.time["dp_comm_total"] * result.hardware.link_bytes_per_s
    assert row["predicted"]["traffic"] == pytest.approx(dp_bytes) and row["ratio"]["traffic"] == pytest.approx(3.0 / dp_bytes)
    assert "x1.000" in plan_verify.table([row]) and "x2.000" in plan_verify.table([row])


def _etbench(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "impls.cli", "plan", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


SMALL = ["--model", "micro", "--devices", "2", "--stages", "3", "--device-mem", "1GiB", "--device-flops", "1e11",
         "--link-gbps", "100", "--global-batch", "8", "--seq-len", "64", "--precision", "fp32",
         "--checkpointing", "off", "--micro-batch-sizes", "4", "--attention", "flash"]


def test_verify_1_fsdp_bytes_equal_the_prediction(tmp_path):
    """micro on 2 devices, ZeRO-3 only: the best layout is FSDP2 over both, and its dry run's
    per-rank parameter, gradient and optimizer bytes are the planner's fp32 prediction exactly
    (FSDP2's dim-0 padding and Adam's step counters are in the formula); the traffic is the ZeRO-3
    volume 3Ψ(N−1)/N (plus the loss's one-scalar all-reduce), and the saved activations the
    planner's terms for one micro-batch."""
    out = tmp_path / "plan.json"
    proc = _etbench(*SMALL, "--top", "3", "--verify", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "verified: the top 1 dry-run as rank 0 of 2" in proc.stdout
    (row,) = json.loads(out.read_text())["verify"]["rows"]
    assert row["label"].startswith("dp2 ZeRO-3/FSDP") and row["status"] == "verified", row
    for key in ("params", "grads", "optimizer"):
        assert row["measured"][key] == row["predicted"][key], key
        assert row["ratio"][key] == 1.0
    assert row["ratio"]["traffic"] == pytest.approx(1.0, abs=1e-4)
    # one micro-batch's saved tensors against Korthikanti's terms with the fused attention's logsumexp
    assert row["ratio"]["activations"] == pytest.approx(1.0, abs=0.05)
    assert row["techniques"] == ["fsdp"] and row["batch_size"] == 4


@pytest.mark.parametrize("value", ["-1", "x", "1.5", ""])
def test_bad_verify_is_one_line_exit_2(tmp_path, value):
    out = tmp_path / "plan.json"
    proc = _etbench(*SMALL, "--verify", value, "--json", str(out))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--verify {value!r}" in lines[0] and "valid: an integer >= 0" in lines[0], lines
    assert proc.stdout == "" and not out.exists() and list(tmp_path.iterdir()) == []
