"""``etbench plan --search recipes`` (:mod:`impls.recipe_planner`, :mod:`impls.recipe_runs`):
model-state bytes of candidates against hand-computed counts of the micro model, the selective
recomputation knapsack against brute force, rejections, ranking, the command line (bad input,
atomic ``--json``) and a ``--verify`` dry run whose measured FSDP bytes equal the prediction."""
import dataclasses
import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from impls import families, planner
from impls import recipe_planner as rp
from impls import selective_recompute as sr
from impls.errors import ConfigError
from impls.planner import GIB, Hardware

ROOT = Path(__file__).resolve().parents[1]
# micro: V=256, T=256, L=4, d=128, d_ff=512, GELU, biases, learned positions, tied LM head
V, T, L, D, F = 256, 256, 4, 128, 512
BLOCK = 4 * D + (3 * D * D + 3 * D) + (D * D + D) + (F * D + F) + (D * F + D)  # 2 norms (w+b), qkv, proj, up, down
PSI = V * D + T * D + L * BLOCK + 2 * D  # token + position embeddings, blocks, final norm
BIG = V * D + T * D + L * (3 * D * D + D * D + F * D + D * F)  # tensors >= 4096 elements: the matrices
TENSORS = 2 + 12 * L + 2
ADAPTERS = L * 16 * ((3 * D + D) + (D + D) + (F + D) + (D + F))  # rank 16: r(m+n) for qkv, proj, up, down


def _ctx(devices=1, mem=80 * GIB, model="micro", seq_len=32, global_batch=8, **kw):
    hw = Hardware(devices, mem, 1e12, 100.0, 100.0, 0.4)
    return rp.Context(model, planner.model_counts(model), hw, rp.Rates.default(hw), seq_len, global_batch, **kw)


def _knobs(precision="bf16", recompute="none", dp=1, tp=1, stage=0, offload="none", optimizer="adamw", lora=False,
           b=8, m=1):
    return rp.Knobs(precision, recompute, dp, tp, stage, offload, optimizer, lora, b, m)


def test_micro_counts_are_the_hand_counts():
    assert planner.model_counts("micro").psi == PSI == 858_880
    assert PSI - BIG == L * (4 * D + 3 * D + D + F + D) + 2 * D


@pytest.mark.parametrize("knobs,device,host", [
    # mixed precision (ZeRO §3.1): 2 + 2 + 12 bytes per parameter, no step tensors
    (_knobs("bf16"), dict(params=2 * PSI, grads=2 * PSI, optimizer=12 * PSI), {}),
    (_knobs("fp8"), dict(params=2 * PSI, grads=2 * PSI, optimizer=12 * PSI), {}),
    # fp32 AdamW: 4 + 4 + 8 and a 4-byte step per tensor
    (_knobs("fp32"), dict(params=4 * PSI, grads=4 * PSI, optimizer=8 * PSI + 4 * TENSORS), {}),
    # 8-bit AdamW: 2 B of moments + 8 B of absmax per 256 elements on the matrices, fp32 state on the rest
    (_knobs("fp32", optimizer="adamw8bit"),
     dict(params=4 * PSI, grads=4 * PSI, optimizer=BIG * (2 + 8 / 256) + (PSI - BIG) * 8), {}),
    (_knobs("bf16", optimizer="adamw8bit"),
     dict(params=2 * PSI, grads=2 * PSI, optimizer=BIG * (4 + 2 + 8 / 256) + (PSI - BIG) * 12), {}),
    # LoRA: the frozen base's parameters, the adapters' parameters, grads and AdamW state (+ step per adapter tensor)
    (_knobs("fp32", lora=True), dict(params=4 * (PSI + ADAPTERS), grads=4 * ADAPTERS,
                                     optimizer=8 * ADAPTERS + 4 * 8 * L), {}),
    # ZeRO over dp = 2 (every dim 0 of micro is even: FSDP2 pads nothing)
    (_knobs("bf16", dp=2, stage=1), dict(params=2 * PSI, grads=2 * PSI, optimizer=12 * PSI / 2), {}),
    (_knobs("bf16", dp=2, stage=3), dict(params=PSI, grads=PSI, optimizer=6 * PSI), {}),
    (_knobs("fp32", dp=2, stage=3), dict(params=2 * PSI, grads=2 * PSI, optimizer=4 * PSI + 4 * TENSORS), {}),
    # ZeRO-Offload / -Infinity: the partitions leave the device for the host
    (_knobs("bf16", dp=2, stage=2, offload="optimizer"), dict(params=2 * PSI, grads=0, optimizer=0),
     dict(grads=PSI, optimizer=6 * PSI)),
    (_knobs("bf16", dp=2, stage=3, offload="params"), dict(params=0, grads=0, optimizer=0),
     dict(params=PSI, grads=PSI, optimizer=6 * PSI)),
])
def test_model_states_are_the_hand_computed_bytes(knobs, device, host):
    ctx = _ctx(devices=knobs.dp)
    got, got_host, names = rp.model_states(ctx, knobs, rp.state_precision(knobs.precision, knobs.optimizer))
    assert got == pytest.approx(device, abs=0) and got_host == pytest.approx(host, abs=0)
    assert set(names) <= set(planner.FORMULAS) | set(rp.FORMULAS)


def _brute_force(items, need):
    """min FLOPs over every subset of the (layer, term) pairs that drops at least ``need`` bytes."""
    pairs = [it for it in items for _ in range(it.copies)]
    best = None
    for mask in itertools.product((0, 1), repeat=len(pairs)):
        if sum(p.bytes for p, x in zip(pairs, mask) if x) >= need:
            cost = sum(p.flops for p, x in zip(pairs, mask) if x)
            best = cost if best is None else min(best, cost)
    return best


def test_selective_knapsack_is_optimal_against_brute_force():
    rng = random.Random(0)
    for _ in range(60):
        items = [sr.Item(f"t{i}", rng.randint(1, 40), rng.randint(0, 30), rng.randint(0, 30), rng.randint(1, 3))
                 for i in range(rng.randint(1, 4))]
        total = sum(it.bytes * it.copies for it in items)
        need = rng.randint(1, total + 5)
        got = sr.min_recompute(items, need)
        want = _brute_force(items, need)
        if want is None:
            assert got is None
            continue
        cost, counts = got
        assert cost == want
        assert sum(it.bytes * counts.get(it.name, 0) for it in items) >= need
        assert cost == sum(it.flops * counts.get(it.name, 0) for it in items)
        assert all(0 <= counts.get(it.name, 0) <= it.copies for it in items)
    assert sr.min_recompute(items, 0) == (0.0, {})


def test_selective_fits_at_least_cost_and_drops_the_attention_core_first():
    """llama-7b at 64 devices: a selective plan fits its device, recomputes less than a full one,
    and (stored attention) drops the 5as^2b term of Korthikanti §5 in every layer it needs."""
    hw = Hardware(64, 80 * GIB, 989e12, 400.0, 400.0, 0.4)
    ctx = rp.Context("llama-7b", planner.model_counts("llama-7b"), hw, rp.Rates.default(hw), 2048, 1024)
    sel = rp.evaluate(ctx, _knobs("bf16", "selective", dp=64, stage=3, b=4, m=4))
    full = rp.evaluate(ctx, _knobs("bf16", "full", dp=64, stage=3, b=4, m=4))
    none = rp.evaluate(ctx, _knobs("bf16", "none", dp=64, stage=3, b=4, m=4))
    assert sel.fits and full.fits and not none.fits and none.kind == "memory"
    assert sel.memory_total <= hw.device_mem and sel.recomputed["attention_scores"] > 0
    assert 0 < sel.time["recompute"] < full.time["recompute"] and sel.step_time < full.step_time
    assert sel.memory["params"] == none.memory["params"] and sel.memory["activations"] < none.memory["activations"]
    small = rp.evaluate(ctx, _knobs("bf16", "selective", dp=64, stage=3, b=1, m=16))
    assert small.kind == "redundant" and "recompute=none" in small.reason


def test_step_time_components_fp8_and_lora_flops():
    hw = Hardware(64, 80 * GIB, 989e12, 400.0, 400.0, 0.4)
    ctx = rp.Context("llama-7b", planner.model_counts("llama-7b"), hw, rp.Rates.default(hw), 2048, 1024)
    bf16 = rp.evaluate(ctx, _knobs("bf16", "full", dp=64, stage=3, b=2, m=8))
    fp8 = rp.evaluate(ctx, _knobs("fp8", "full", dp=64, stage=3, b=2, m=8))
    for c in (bf16, fp8):
        t = c.time
        assert c.step_time == pytest.approx(t["compute"] + t["recompute"] + t["tp_comm"] + t["dp_comm_exposed"]
                                            + t["offload"])
    cfg = ctx.cfg  # Llama-7B: no biases, SwiGLU (gate|up fused), untied head of 32000 x 4096
    h, dff = cfg.d_model, cfg.d_ff
    n_block = cfg.n_layer * (3 * h * h + h * h + 2 * dff * h + h * dff)
    n_head = ctx.counts.matmul_params - n_block  # the LM head (and the norms' weights the 6N counts)
    assert n_head == cfg.vocab_size * h + (2 * cfg.n_layer + 1) * h
    attn = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * 2048
    tokens = 1024 * 2048 / 64
    rate = 989e12 * 0.4
    assert bf16.time["compute"] == pytest.approx((6 * (n_block + n_head) + attn) * tokens / rate)
    # fp8: the block GEMMs at twice the rate, the LM head and attention core at bf16
    assert fp8.time["compute"] == pytest.approx((6 * n_block / 2 + 6 * n_head + attn) * tokens / rate)
    # LoRA (Hu et al. §4.2): 4N + 6N_adapter + 12LHQT model FLOPs per token
    n_adapter = sum(m * n for m, n in rp.lora_shapes(cfg, 16))
    assert rp.model_flops_per_step(ctx, True) == pytest.approx(
        (4 * (n_block + n_head) + 6 * n_adapter + attn) * 1024 * 2048)


def test_rejections_carry_reasons_and_ranking_is_by_step_time():
    hw = Hardware(4, 0.006 * GIB, 1e12, 100.0, 100.0, 0.4)
    result = rp.plan_recipes("micro", hw, seq_len=64, global_batch=8, search=rp.Search(lora=(False, True)))
    assert result.ranked and result.rejected
    steps = [c.step_time for c in result.ranked]
    assert steps == sorted(steps) and all(c.fits and c.memory_total <= hw.device_mem for c in result.ranked)
    kinds = {c.kind for c in result.rejected}
    assert {"memory", "incompatible", "redundant"} <= kinds
    for c in result.rejected:
        assert not c.fits and c.reason
    memory = [c for c in result.rejected if c.kind == "memory" and c.reason.startswith("does not fit:")]
    assert memory and all("GiB" in c.reason and "largest component" in c.reason for c in memory)
    incompatible = {c.reason.split(":")[0] for c in result.rejected if c.kind == "incompatible"}
    assert any("needs ZeRO stage" in r for r in incompatible)
    for c in result.ranked:  # a recipe, or the reason there is none
        assert (c.recipe is None) != (c.recipe_reason is None) and c.recipe_states is not None


def test_divisibility_and_the_candidate_limit(monkeypatch):
    hw = Hardware(3, 80 * GIB, 1e12, 100.0, 100.0, 0.4)
    result = rp.plan_recipes("micro", hw, seq_len=64, global_batch=8,
                             search=rp.Search(precisions=("bf16",), recompute=("none",), tps=(3,)))
    assert not result.ranked and {c.kind for c in result.rejected} <= {"divisibility", "incompatible"}
    assert any("heads 4 % t=3" in c.reason for c in result.rejected)
    monkeypatch.setattr(rp, "MAX_CANDIDATES", 100)  # refused in one line, before any evaluation
    with pytest.raises(ConfigError, match="more than 100 recipes to evaluate; valid: a narrower search"):
        rp.plan_recipes("micro", Hardware(4, 80 * GIB, 1e12, 100.0, 100.0, 0.4), seq_len=64, global_batch=8)


def test_recipe_mapping():
    ctx = _ctx(devices=2, global_batch=4)
    cand = rp.evaluate(ctx, _knobs("bf16", "full", dp=2, stage=3, b=1, m=2))
    from impls import recipe_runs

    recipe_runs.map_recipe(ctx, cand)
    assert cand.recipe["techniques"] == ["fsdp:mp=bf16", "checkpoint", "grad_accum:steps=2"]
    assert cand.recipe_states == {"params": 2 * PSI, "grads": 2 * PSI, "optimizer": 4 * PSI + 4 * TENSORS}
    assert cand.recipe_fits and recipe_runs.fsdp_accumulation_bytes(ctx, cand.knobs) == 4 * PSI / 2
    assert any("unsharded gradients" in n for n in cand.recipe_notes)
    off = rp.evaluate(ctx, _knobs("bf16", dp=2, stage=2, offload="optimizer", b=2))
    recipe_runs.map_recipe(ctx, off)
    assert off.recipe["techniques"] == ["zero:stage=2,offload_optimizer=cpu", "bf16"]
    eight = rp.evaluate(ctx, _knobs("bf16", dp=2, stage=3, optimizer="adamw8bit", b=2))
    recipe_runs.map_recipe(ctx, eight)
    assert eight.recipe is None and "bitsandbytes" in eight.recipe_reason


ARGS = ["plan", "--search", "recipes", "--model", "micro", "--devices", "2", "--device-mem", "1GiB",
        "--device-flops", "1e12", "--link-gbps", "10", "--global-batch", "2", "--seq-len", "32"]


def _etbench(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "impls.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


@pytest.mark.parametrize("extra,named", [
    (["--precisions", "fp16"], "--precisions 'fp16'"),
    (["--recompute", "some"], "--recompute 'some'"),
    (["--offload", "disk"], "--offload 'disk'"),
    (["--optimizers", "sgd"], "--optimizers 'sgd'"),
    (["--tp", "3"], "--tp '3'"),
    (["--lora", "maybe"], "--lora 'maybe'"),
    (["--lora", "on", "--lora-rank", "4096"], "--lora-rank 4096"),
    (["--host-mem", "lots"], "--host-mem 'lots'"),
    (["--host-link-gbps", "0"], "--host-link-gbps '0'"),
    (["--device-fp8-flops", "-1"], "--device-fp8-flops '-1'"),
    (["--search", "everything"], "--search 'everything'"),
    (["--verify", "-1"], "--verify '-1'"),
])
def test_cli_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, extra, named):
    from impls import cli

    out = tmp_path / "plan.json"
    assert cli.main([*ARGS, *extra, "--json", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "valid" in lines[0], captured.err
    assert captured.out == "" and sorted(tmp_path.iterdir()) == []


def test_cli_bad_input_exit_status_of_the_process(tmp_path):
    out = tmp_path / "plan.json"
    proc = _etbench(*ARGS, "--precisions", "fp16", "--json", str(out))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stdout == "" and sorted(tmp_path.iterdir()) == []


def test_cli_writes_json_atomically(tmp_path, monkeypatch, capsys):
    from impls import cli, files

    out = tmp_path / "plan.json"
    out.write_text("previous")
    written = []
    real = files.write_text

    def spy(path, text):  # the JSON goes through the atomic writer
        written.append(str(path))
        return real(path, text)

    monkeypatch.setattr(files, "write_text", spy)
    assert cli.main([*ARGS, "--top", "5", "--json", str(out)]) == 0
    assert written == [str(out)]
    data = json.loads(out.read_text())
    assert data["kind"] == families.RECIPE_PLAN and data["ranked"] and data["assumptions"]
    steps = [c["step_time"] for c in data["ranked"]]
    assert steps == sorted(steps) and set(data["ranked"][0]["formulas"]) <= set(data["formulas"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]
    text = capsys.readouterr().out
    assert "step s" in text and "assumptions:" in text and "etbench run" in text


def test_cli_verify_measures_the_predicted_fsdp_bytes(tmp_path):
    """The top FSDP2 candidates dry-run as rank 0 of 2: fp32 and bf16 (fsdp:mp=bf16, fp32 shards)
    hold exactly the predicted bytes of the recipe as stored; the bf16 candidate's own 2+2+12
    prediction differs by the known ratios (x2 params and grads, x8/12 optimizer + step tensors)."""
    out = tmp_path / "plan.json"
    proc = _etbench(*ARGS, "--precisions", "fp32,bf16", "--recompute", "none", "--offload", "none",
                    "--optimizers", "adamw", "--stages", "3", "--tp", "1", "--micro-batch-sizes", "1",
                    "--verify", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "measured/predicted" in proc.stdout
    ranked = json.loads(out.read_text())["ranked"]
    assert [c["knobs"]["precision"] for c in ranked] == ["bf16", "fp32"]
    for c in ranked:
        v = c["verification"]
        assert v["status"] == "verified", v
        for comp in ("params", "grads", "optimizer"):
            assert v["measured"][comp] == v["predicted_recipe"][comp]
        assert v["predicted_recipe"]["params"] == 2 * PSI
        assert v["predicted_recipe"]["optimizer"] == 4 * PSI + 4 * TENSORS
        assert v["ratio_recipe"]["traffic"] == pytest.approx(1, abs=1e-4)
    bf16 = ranked[0]["verification"]["ratio_candidate"]
    assert bf16["params"] == 2 and bf16["grads"] == 2
    assert bf16["optimizer"] == pytest.approx((4 * PSI + 4 * TENSORS) / (6 * PSI))


def test_dry_run_leaves_out_what_a_cpu_cannot_run(monkeypatch):
    """fp8 refused on a CPU and a dry run failing under grad_accum are retried without them, with
    notes; any other refusal is the reason the candidate is not verified."""
    from impls import dryrun, recipe_runs
    from impls.recipe import Recipe

    ran = []

    def fake(recipe, world_size, rank):
        ran.append(list(recipe.techniques))
        if any(t.startswith("fp8") for t in recipe.techniques):
            raise ConfigError("fp8: float8 GEMMs need a CUDA GPU; on this run's device 'cpu' ...")
        if any(t.startswith("grad_accum") for t in recipe.techniques):
            raise NotImplementedError("tracker does not support multiple iterative calls")
        if "zero:stage=1" in recipe.techniques:
            raise ConfigError("dry run cannot run technique 'zero': DeepSpeed")
        return {"ok": True}

    monkeypatch.setattr(dryrun, "dry_run", fake)
    recipe = Recipe(model="micro", techniques=["fsdp:mp=bf16", "fp8", "grad_accum:steps=2"], device="cpu", steps=1)
    record, why, notes, single = recipe_runs.dry_runnable(recipe, 2)
    assert record == {"ok": True} and why is None and single
    assert ran == [["fsdp:mp=bf16", "fp8", "grad_accum:steps=2"], ["fsdp:mp=bf16", "grad_accum:steps=2"],
                   ["fsdp:mp=bf16"]]
    assert "without fp8" in notes[0] and "one micro-batch" in notes[1]
    record, why, notes, single = recipe_runs.dry_runnable(dataclasses.replace(recipe, techniques=["zero:stage=1"]), 2)
    assert record is None and why.startswith("dry run cannot run technique 'zero'") and not notes
