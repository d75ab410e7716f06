import json
import math
import os
import subprocess
import sys

import pytest

from impls import train
from impls.errors import ConfigError

QUICK = dict(model="nano", batch_size=4, seq_len=32, eval_batches=2, timing_warmup=1)
REQUIRED = {"recipe", "git_commit", "versions", "device", "world_size", "seed", "dataset", "params",
            "flops_per_step", "model_flops_per_step", "tokens_per_second", "seconds_per_step", "mfu",
            "hfu", "memory", "curve"}


@pytest.fixture(scope="module")
def record():
    return train.run(train.Recipe(**QUICK, steps=30, lr=3e-3, eval_every=10))


def test_record_holds_every_field_the_suite_promises(record):
    assert REQUIRED <= set(record)
    assert set(record["memory"]) >= {"params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes",
                                     "peak_bytes"}
    assert set(record["versions"]) >= {"python", "torch", "deepspeed"}
    assert record["dataset"]["hash"] and record["dataset"]["entropy_floor"] > 0
    assert [p["step"] for p in record["curve"]] == [0, 10, 20, 30]
    for point in record["curve"]:
        assert set(point) == {"step", "flops", "model_flops", "tokens", "train_loss", "val_loss"}
        assert point["flops"] == point["step"] * record["flops_per_step"]
    json.dumps(record)  # JSON-able as is


def test_memory_is_exact_for_adamw_fp32(record):
    m, n = record["memory"], record["params"]
    assert m["params_bytes"] == m["grads_bytes"] == 4 * n
    assert 8 * n <= m["optimizer_bytes"] <= 8 * n + 4 * 64  # two moments + one step scalar per tensor
    assert m["activations_bytes"] > 0 and m["peak_bytes"] > m["params_bytes"]


def test_throughput_and_utilisation_are_consistent(record):
    assert record["tokens_per_second"] == pytest.approx(record["tokens_per_step"] / record["seconds_per_step"])
    assert record["hfu"] / record["mfu"] == pytest.approx(record["flops_per_step"] / record["model_flops_per_step"])
    assert 0 < record["mfu"] < 1.5


def test_training_lowers_the_loss(record):
    losses = [p["val_loss"] for p in record["curve"]]
    assert losses[-1] < losses[0] - 0.5  # from ~log(64) = 4.16 towards the floor


def test_same_seed_gives_a_bit_identical_curve(record):
    again = train.run(train.Recipe(**QUICK, steps=30, lr=3e-3, eval_every=10))
    assert again["curve"] == record["curve"]
    other = train.run(train.Recipe(**QUICK, steps=30, lr=3e-3, eval_every=10, seed=1))
    assert other["curve"] != record["curve"]


def test_flops_budget_stops_before_exceeding_it():
    budget = 5e9
    rec = train.run(train.Recipe(**QUICK, flops_budget=budget))  # model FLOPs by default
    assert rec["recipe"]["budget_flops"] == "model"
    assert rec["steps"] == math.floor(budget / rec["model_flops_per_step"])
    last = rec["curve"][-1]
    assert last["model_flops"] <= budget < last["model_flops"] + rec["model_flops_per_step"]
    counted = train.run(train.Recipe(**QUICK, flops_budget=budget, budget_flops="counted"))
    assert counted["steps"] == math.floor(budget / counted["flops_per_step"])
    assert counted["curve"][-1]["flops"] <= budget < counted["curve"][-1]["flops"] + counted["flops_per_step"]


def test_implementations_of_the_same_function_get_the_same_steps_under_a_model_flop_budget():
    """math and sdpa attention, and activation checkpointing, compute the same function: a budget
    in model FLOPs gives them the same steps, while their counted (hardware) FLOPs differ."""
    budget = 4e9
    runs = {spec: train.run(train.Recipe(**{**QUICK, "eval_every": None}, flops_budget=budget,
                                         techniques=[spec] if spec else []))
            for spec in ("attention:kind=sdpa", "attention:kind=math", "checkpoint")}
    steps = {spec: r["steps"] for spec, r in runs.items()}
    assert len(set(steps.values())) == 1, steps
    counted = {spec: r["flops_per_step"] for spec, r in runs.items()}
    assert len(set(counted.values())) == 3, counted  # recomputation and kernels change the hardware work
    assert runs["checkpoint"]["hfu"] > runs["checkpoint"]["mfu"]


def test_masked_lm_encoder_trains():
    rec = train.run(train.Recipe(**{**QUICK, "model": "encoder-nano"}, steps=20, lr=3e-3))
    losses = [p["val_loss"] for p in rec["curve"]]
    assert rec["params"] > 0 and losses[-1] < losses[0]


@pytest.mark.parametrize("change,message", [
    (dict(model="gpt5"), "unknown model 'gpt5'; valid: nano"),
    (dict(data="wikitext"), "unknown data 'wikitext'; valid: synthetic, pycode, tokens:PATH"),
    (dict(techniques=["warp-drive"]), "unknown technique 'warp-drive'"),
    (dict(optimizer="adamax"), "unknown optimizer 'adamax'; valid: "),
    (dict(techniques=["bf16", "fp16"]), "techniques 'bf16' and 'fp16' cannot be combined: a run has one autocast dtype"),
    (dict(techniques=["bf16", "bf16"]), "technique 'bf16' given more than once"),
    (dict(techniques=["fp16:scaling=maybe"]), "bad value 'maybe' for fp16:scaling; valid: true, false"),
    (dict(techniques=["grad_accum:stesp=2"]), "bad option 'stesp=2' for technique 'grad_accum'; valid keys: steps"),
    (dict(lr_scaling="cubic"), "unknown lr_scaling 'cubic'; valid: none, linear, sqrt"),
    (dict(data="tokens:/nonexistent/corpus.bin"), "/nonexistent/corpus.bin"),
    (dict(seq_len=1000), "seq_len 1000 exceeds model 'nano' block_size 128"),
    (dict(steps=None, flops_budget=1e3), "flops_budget 1e+03 is smaller than one step"),
    (dict(steps=None), "give exactly one of steps or flops_budget"),
])
def test_bad_input_fails_before_any_work_with_one_clear_line(change, message):
    recipe = train.Recipe(**{**QUICK, "steps": 5, **change})
    with pytest.raises(ConfigError) as info:
        train.validate(recipe)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_write_record_is_atomic(tmp_path, record):
    path = train.write_record(record, tmp_path / "sub" / "run.json")
    assert json.loads(path.read_text())["curve"] == record["curve"]
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "impls.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": os.getcwd()})


def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "run.json"
    proc = _cli("run", "--model", "nope", "--steps", "3", "--out", str(out))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown model 'nope'" in proc.stderr
    assert not out.exists()


def test_cli_runs_two_ranks_under_torchrun(tmp_path):
    out = tmp_path / "ddp.json"
    proc = _cli("run", "--nproc", "2", "--model", "nano", "--batch-size", "2", "--seq-len", "32",
                "--steps", "6", "--eval-batches", "1", "--timing-warmup", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert rec["world_size"] == 2 and rec["label"].endswith("/ws2")
    assert rec["tokens_per_step"] == 2 * 2 * 32
    # Data parallel: every rank holds the full model state.
    assert rec["memory"]["params_bytes"] == 4 * rec["params"]


def test_conditional_computation_counts_its_own_model_flops():
    """6N + 12·L·H·Q·T assumes every token passes every block; MoD does not, so its MFU numerator
    is the counted FLOPs, never the dense formula."""
    dense = train.run(train.Recipe(**QUICK, steps=2))
    routed = train.run(train.Recipe(**QUICK, steps=2, techniques=["mod:capacity=0.5,every=1"]))
    assert dense["model_flops_source"] == "analytic 6N+12LHQT"
    assert routed["model_flops_source"] == "counted (conditional computation)"
    assert routed["model_flops_per_step"] == routed["flops_per_step"] < dense["model_flops_per_step"]
    assert routed["mfu"] == routed["hfu"]
