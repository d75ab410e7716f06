"""Tests of impls.measure.model_states: the ZeRO paper's formulas against its worked example, Ψ of
big zoo models on the meta device, the communication volumes, the memory table and its CLI."""
from __future__ import annotations

import json

import pytest
import torch

from impls import optimizers, zoo
from impls.errors import ConfigError
from impls.measure import model_state_bytes
from impls.measure import model_states as ms

GB = 1e9


@pytest.mark.parametrize("stage, expected_gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_paper_worked_example(stage, expected_gb):
    """ZeRO Fig. 1: Ψ = 7.5B, N_d = 64, K = 12 -> 120 GB, 31.4 GB, 16.6 GB, 1.9 GB per device."""
    total = ms.formula(7.5e9, 64, stage)["total"] / GB
    assert total == pytest.approx(expected_gb, abs=0.05)


def test_formula_components_exact():
    psi, n = 7.5e9, 64
    assert ms.formula(psi, n, 0) == {"params": 2 * psi, "grads": 2 * psi, "optimizer": 12 * psi, "total": 16 * psi}
    assert ms.formula(psi, n, 1) == {"params": 2 * psi, "grads": 2 * psi, "optimizer": 12 * psi / n,
                                     "total": 4 * psi + 12 * psi / n}
    f2 = ms.formula(psi, n, 2)
    assert (f2["params"], f2["grads"] + f2["optimizer"]) == (2 * psi, 14 * psi / n)
    assert ms.formula(psi, n, 3)["total"] == pytest.approx(16 * psi / n)
    # fp32 training: 4Ψ + 4Ψ + 8Ψ (Adam, no master copy); one rank: every stage is the baseline.
    assert ms.formula(psi, 1, 3, param_bytes=4, grad_bytes=4, k=8)["total"] == 16 * psi
    assert ms.formula(psi, 8, 3, param_bytes=4, grad_bytes=4, k=8)["total"] == 2 * psi
    # The memory reductions the paper quotes for large N_d: 4x, 8x, N_d x.
    big = 10**6
    base = ms.formula(psi, big, 0)["total"]
    assert base / ms.formula(psi, big, 1)["total"] == pytest.approx(4, rel=1e-3)
    assert base / ms.formula(psi, big, 2)["total"] == pytest.approx(8, rel=1e-3)
    assert base / ms.formula(psi, big, 3)["total"] == pytest.approx(big)


@pytest.mark.parametrize("args", [(-1, 4, 0), (10, 0, 0), (10, 2.5, 0), (10, 4, 4), (10, 4, -1), (float("inf"), 1, 0)])
def test_formula_rejects_bad_input(args):
    with pytest.raises(ConfigError):
        ms.formula(*args)


def test_bytes_per_param_covers_every_etbench_optimizer():
    assert set(ms.K_FP32) == set(optimizers.OPTIMIZERS)
    assert ms.bytes_per_param("adamw") == (4, 4, 8)
    assert ms.bytes_per_param("adam", autocast=True) == (4, 4, 8)  # autocast keeps fp32 weights
    assert ms.bytes_per_param("adamw", low_precision_params=True, autocast=True) == (2, 2, 12)
    assert ms.bytes_per_param("sgd") == (4, 4, 4)
    assert ms.bytes_per_param("lion", True, True) == (2, 2, 8)
    p, g, k = ms.bytes_per_param("adamw8bit")
    assert (p, g) == (4, 4) and k == pytest.approx(2.03125)
    assert "approximate" in ms.check_run({}, 10, 1, 0, optimizer="adamw8bit")
    assert ms.bytes_per_param("adafactor") is None
    with pytest.raises(ConfigError, match="unknown optimizer 'adamx'"):
        ms.bytes_per_param("adamx")
    with pytest.raises(ConfigError, match="autocast"):
        ms.bytes_per_param("adamw", low_precision_params=True, autocast=False)


def test_check_ratios_and_tolerance():
    psi, n = 1000, 4
    exact = {"params_bytes": 2000, "grads_bytes": 500, "optimizer_bytes": 3000}  # ZeRO-2, mixed precision
    block = ms.check(exact, psi, n, 2)
    assert block["formula"] == {"params": 2000.0, "grads": 500.0, "optimizer": 3000.0, "total": 5500.0}
    assert block["ratio"] == {"params": 1.0, "grads": 1.0, "optimizer": 1.0, "total": 1.0}
    assert block["ok"] is True and block["stage_name"] == "ZeRO-2 P_os+g"
    off = ms.check({**exact, "optimizer_bytes": 3000 * 1.03}, psi, n, 2)  # 3% too many optimizer bytes
    assert off["ratio"]["optimizer"] == pytest.approx(1.03)
    assert off["within_tolerance"]["optimizer"] is False and off["ok"] is False
    assert off["within_tolerance"]["params"] is True
    # DDP-sized grads under a ZeRO-2 claim: 4x the formula, flagged.
    assert ms.check({**exact, "grads_bytes": 2000}, psi, n, 2)["ratio"]["grads"] == 4.0
    # K = 0 (no optimizer state): no ratio for that component, the rest still checked.
    zero = ms.check({"params_bytes": 4000, "grads_bytes": 4000, "optimizer_bytes": 0}, psi, 1, 0,
                    param_bytes=4, grad_bytes=4, k=0)
    assert zero["ratio"]["optimizer"] is None and zero["ok"] is True
    missing = ms.check({"params_bytes": 2000}, psi, n, 2)
    assert missing["measured"]["total"] is None and missing["ratio"]["grads"] is None
    uncovered = ms.check_run(exact, psi, n, 2, optimizer="adafactor")
    assert uncovered["covered"] is False and uncovered["formula"] is None and "Adafactor" in uncovered["reason"]


def test_measured_bytes_of_a_real_run_match_the_formula(one_thread):
    """One process (N_d = 1), fp32 AdamW: the exact meters give 4Ψ + 4Ψ + 8Ψ within the 2% tolerance
    (Adam's 4-byte ``step`` per tensor is the only difference)."""
    torch.manual_seed(0)
    model = zoo.build("nano")
    opt = optimizers.build("adamw", model, lr=1e-3, weight_decay=0.1)
    x = torch.randint(0, 256, (2, 16))
    model(x).float().logsumexp(-1).mean().backward()
    opt.step()
    psi = ms.trainable_params("nano")
    assert psi == sum(p.numel() for p in model.parameters())
    block = ms.check_run(model_state_bytes(model, opt), psi, 1, 0, optimizer="adamw")
    assert block["ok"] is True
    assert block["ratio"]["params"] == 1.0 and block["ratio"]["grads"] == 1.0
    n_tensors = len(list(model.parameters()))
    assert block["measured"]["optimizer"] - block["formula"]["optimizer"] == 4 * n_tensors


def test_psi_of_big_models_on_meta():
    gpt2_xl, llama = ms.trainable_params("gpt2-xl"), ms.trainable_params("llama-7b")
    assert 1.5e9 < gpt2_xl < 1.6e9  # GPT-2 1.5B (tied embedding counted once)
    assert 6.6e9 < llama < 6.8e9  # Llama-2-7B: 6.74B
    assert llama == zoo.build("llama-7b", device="meta").num_params()
    assert ms.trainable_params("nano", n_layer=1) < ms.trainable_params("nano")


def test_comm_volume_conventions():
    psi, n = 1000, 4
    ddp, z1, z2, z3 = (ms.comm_volume(psi, n, s) for s in range(4))
    assert [v["elements"] for v in (ddp, z1, z2, z3)] == [2 * psi, 2 * psi, 2 * psi, 3 * psi]
    assert z3["elements"] / ddp["elements"] == 1.5
    assert ddp["bytes"] == 2 * psi * 2  # 16-bit gradients by default
    assert ddp["ring_factor"] == 0.75 and ddp["ring_bytes"] == 2 * psi * 2 * 0.75
    assert ddp["payload_bytes"] == psi * 2  # one all-reduce of Ψ
    assert z2["payload_bytes"] == 2 * psi * 2 and z3["payload_bytes"] == 3 * psi * 2
    assert [c["op"] for c in z3["collectives"]] == ["all_gather", "all_gather", "reduce_scatter"]
    fp32 = ms.comm_volume(psi, n, 3, grad_bytes=4, param_bytes=2)
    assert fp32["bytes"] == psi * (2 + 2 + 4)
    assert ms.comm_volume(psi, 1, 0)["ring_bytes"] == 0.0  # one rank sends nothing
    c = ms.comm_check(3000.0, psi, n, 0)
    assert c["ratio_paper"] == 0.75 and c["ratio_ring"] == 1.0 and c["ratio_payload"] == 1.5
    assert ms.comm_check(10.0, psi, 1, 0)["ratio_ring"] is None


def test_memory_table_values():
    rows = ms.memory_table(("gpt2-xl", "llama-7b"), (1, 8, 64, 1024), 80e9)
    assert len(rows) == 2 * 4 * 4
    by = {(r["model"], r["stage"], r["n_d"]): r for r in rows}
    psi = ms.trainable_params("llama-7b")
    ddp = by[("llama-7b", 0, 8)]
    assert ddp["total_bytes"] == 16 * psi and ddp["total_gib"] == pytest.approx(16 * psi / 2**30)
    assert ddp["fits"] is False  # 108 GB of model states: Llama-7B does not fit one 80 GB GPU under DDP
    assert by[("llama-7b", 1, 8)]["total_bytes"] == pytest.approx(4 * psi + 12 * psi / 8)
    assert by[("llama-7b", 1, 8)]["fits"] is True
    assert by[("llama-7b", 3, 1024)]["total_bytes"] == pytest.approx(16 * psi / 1024)
    assert by[("llama-7b", 0, 1)]["offload_gpu_gib"] == pytest.approx(4 * psi / 2**30)
    assert by[("llama-7b", 0, 1)]["offload_host_gib"] == pytest.approx(12 * psi / 2**30)
    assert by[("llama-7b", 0, 1)]["offload_fits"] is True
    assert all(r["fits"] for r in rows if r["model"] == "gpt2-xl")  # 25 GB at most
    small = ms.memory_table(("llama-7b",), (8,), 20e9)
    assert [r["fits"] for r in small] == [False, False, False, True]
    text = ms.memory_table_markdown(rows)
    assert "| llama-7b | 6.738B | DDP | 100.41 ✗ |" in text and "activations" in text
    for bad in ({"models": ("gpt9",)}, {"n_ds": (0,)}, {"gpu_bytes": -1}, {"optimizer": "adafactor"}):
        with pytest.raises(ConfigError):
            ms.memory_table(**bad)


def test_cli_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert ms.main(["--models", "gpt2-xl", "--n-d", "1", "64", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| gpt2-xl | 1.558B | ZeRO-3 P_os+g+p | 23.21 ✓ | 0.36 ✓ |" in printed
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 8 and {r["n_d"] for r in rows} == {1, 64}


@pytest.mark.parametrize("argv, message", [
    (["--models", "gpt9"], "unknown model 'gpt9'; valid: nano"),
    (["--n-d", "0"], "N_d '0' is not an integer >= 1"),
    (["--n-d", "x"], "N_d 'x' is not an integer >= 1"),
    (["--gpu-gb", "-3"], "--gpu-gb '-3' is not a positive number"),
    (["--optimizer", "adafactor"], "not cover"),
    (["--optimizer", "adamx"], "unknown optimizer 'adamx'"),
])
def test_cli_bad_input_is_one_line_exit_2(argv, message, capsys, tmp_path):
    try:
        status = ms.main([*argv, "--json", str(tmp_path / "never.json")])
    except SystemExit as exc:  # argparse's type errors exit from parse_args
        status = exc.code
    err = capsys.readouterr()
    assert status == 2 and err.out == ""
    assert err.err.count("\n") == 1 and err.err.startswith("etbench: error: ") and message in err.err
    assert not (tmp_path / "never.json").exists()


def test_deepspeed_estimators_differ_from_the_paper_by_the_fp32_gradient_partition():
    """DeepSpeed's own estimators, called: ZeRO-2 2Ψ + 18Ψ/N, ZeRO-3 18Ψ/N + 4·largest layer; the
    difference from the paper is stated."""
    pytest.importorskip("deepspeed")
    psi, n = 10**6, 4
    z2 = ms.deepspeed_estimate(psi, n, 2)
    assert z2["deepspeed_bytes"] == 2 * psi + 18 * psi // n and z2["paper_bytes"] == 2 * psi + 14 * psi / n
    assert z2["difference_bytes"] == 4 * psi / n and "fp32" in z2["explanation"]
    largest = ms.largest_layer_params("nano")
    assert largest == 64 * 256 + 256  # an MLP projection d_model 64 -> d_ff 256 with its bias (> the 256×64 embedding)
    z3 = ms.deepspeed_estimate(psi, n, 3, largest_layer_params=largest)
    assert z3["deepspeed_bytes"] == 4 * largest + 18 * psi // n and z3["paper_bytes"] == 16 * psi / n
    assert ms.deepspeed_estimate(psi, n, 1) is None
