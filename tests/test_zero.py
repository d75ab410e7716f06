"""DeepSpeed ZeRO 1/2/3 through the ``deepspeed`` engine (technique ``zero``), and ``onebit``.

Multi-rank tests spawn gloo ranks once and run several jobs in them (DDP reference, each ZeRO
stage, a save/resume), so the process start-up (torch + deepspeed imports) is paid once.
What they check:

* losses of every step equal DDP's, and after 3 fp32 steps the parameters equal DDP's (tight
  tolerance: same gradients — ZeRO averages over dp like DDP — and the same AdamW arithmetic on a
  flat partition);
* per-rank model-state bytes against the ZeRO paper's fp32 formula for the stage (params 4Ψ,
  grads 4Ψ, Adam 8Ψ; sharded parts / N_d), with the one structural residual stated: DeepSpeed's
  fp32 master partition (+4Ψ/N_d in optimizer bytes), and flat-buffer padding (< 0.1% here);
* resume from ``state_dict``/``load_state_dict`` is bit-identical at the same world size;
* refusals exit 2 via the CLI before any work.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from impls import train

ROOT = Path(__file__).resolve().parents[1]
FIELDS = dict(model="nano", steps=3, batch_size=4, seq_len=32, device="cpu", eval_batches=1)
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _params(session) -> dict:
    model = session.model
    if getattr(session.engine, "stage", 0) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {n: p.detach().clone() for n, p in model.named_parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _train(session, start: int, stop: int) -> list[float]:
    losses = []
    for step in range(start, stop):
        x, y = session.batches.get("train", step)
        losses.append(session.ctx.all_mean(session.engine.train_step(x, y, step)))
    return losses


def _job(name: str, fields: dict, resume_at: int | None) -> dict:
    session = train.prepare(train.Recipe(**fields))
    x, y = session.batches.get("train", 0)
    accum = session.plan.accum_steps
    out = dict(flops=session.engine.count_flops(x, y),
               activations=session.engine.activation_bytes(x.chunk(accum)[0].clone(), y.chunk(accum)[0].clone()))
    out["losses"] = []
    out["grad_norms"] = []
    for step in range(STEPS):
        out["losses"] += _train(session, step, step + 1)
        out["grad_norms"].append(session.engine.last_grad_norm)
    out["params"] = _params(session)
    out["state"] = session.engine.state_bytes() if hasattr(session.engine, "stage") else None
    out["notes"] = session.build.notes_for_record().get("zero")
    out["precision"] = session.plan.precision
    out["param_dtypes"] = sorted({str(p.dtype) for p in session.model.parameters()})
    out["psi"] = session.model.num_params()
    zero = getattr(session.engine, "optimizer", None)
    # stage 2 keeps the whole gradient of every tensor overlapping this rank's partition
    out["whole_grad_elements"] = sum(p.numel() for g in getattr(zero, "params_in_partition", []) for p in g)
    if resume_at is not None:
        again = train.prepare(train.Recipe(**fields))
        _train(again, 0, resume_at)
        mine = again.engine.state_dict()
        everyone = [None] * session.ctx.world_size
        torch.distributed.all_gather_object(everyone, mine)
        union = dict(mine, files={k: v for s in everyone for k, v in s["files"].items()})
        out["files"] = {k: len(v) for k, v in mine["files"].items()}
        fresh = train.prepare(train.Recipe(**fields))
        fresh.engine.load_state_dict(union)
        out["resumed_losses"] = _train(fresh, resume_at, STEPS)
        out["resumed_params"] = _params(fresh)
    return out


def _rank(rank: int, world: int, port: int, out: str, jobs: list):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from impls import dist

    results = {name: _job(name, fields, resume_at) for name, fields, resume_at in jobs}
    torch.save(results, f"{out}.{rank}")
    dist.shutdown()


def _spawn(tmp_path, world: int, jobs: list, timeout: float = 600) -> list[dict]:
    out = str(tmp_path / "zero")
    ranks = torch.multiprocessing.start_processes(_rank, args=(world, _free_port(), out, jobs), nprocs=world,
                                                  join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"ranks did not finish within {timeout} s")
    return [torch.load(f"{out}.{r}") for r in range(world)]


def _paper_fp32(psi: int, dp: int, stage: int) -> dict:
    """The ZeRO paper's fp32 equivalents per rank: params 4Ψ, grads 4Ψ, Adam 8Ψ; stage s shards
    optimizer (s >= 1), grads (s >= 2), params (s >= 3) over N_d."""
    return dict(params_bytes=4 * psi / (dp if stage >= 3 else 1), grads_bytes=4 * psi / (dp if stage >= 2 else 1),
                optimizer_bytes=8 * psi / dp)


def _check_bytes(got: dict, dp: int, stage: int, low_precision: bool = False) -> dict:
    """Measured per-rank bytes vs the paper's formula (fp32 equivalents 4Ψ + 4Ψ + 8Ψ, or mixed
    precision 2Ψ + 2Ψ + 12Ψ with ``low_precision``); returns {key: (measured, formula, ratio)}.
    Residuals, asserted exactly rather than hidden in a tolerance:

    * fp32 optimizer: DeepSpeed keeps an fp32 master partition (4Ψ/N_d) even for an fp32 module,
      so optimizer = 8Ψ/N_d + 4Ψ/N_d (mixed precision: K = 12 already counts it);
    * + 8 bytes: AdamW's ``step`` scalar of each of the 2 param groups; padding of the flat
      partitions to a multiple of N_d (< 0.1%): tolerance 0.1%;
    * stage-2 grads: ``grads_in_partition`` holds the whole gradient of every tensor that overlaps
      this rank's partition (a tensor straddling the boundary is kept whole on both ranks): exactly
      Σ numel(params_in_partition) elements — on nano's few large tensors +11% / +18% over
      Ψ/N_d, on a model with many tensors at most one tensor per param group more."""
    state, psi = got["state"], got["notes"]["params"]
    zero_notes_formula = got["notes"]["paper_formula"]
    p, g, o = (2, 2, 12) if low_precision else (4, 4, 8)
    formula = dict(params_bytes=p * psi / (dp if stage >= 3 else 1), grads_bytes=g * psi / (dp if stage >= 2 else 1),
                   optimizer_bytes=o * psi / dp)
    assert zero_notes_formula == pytest.approx(formula) and got["notes"]["paper_k"] == 12  # the record's formula
    expected = dict(formula)
    if not low_precision:
        expected["optimizer_bytes"] += 4 * psi / dp
    if stage == 2 and dp > 1:
        expected["grads_bytes"] = g * got["whole_grad_elements"]
    for key, want in expected.items():
        assert state[key] == pytest.approx(want, rel=1e-3), (key, state[key], want, state["breakdown"])
    return {k: (state[k], formula[k], round(state[k] / formula[k], 4)) for k in formula}


STAGES = (1, 2, 3)
LR = train.Recipe().lr


def _assert_params_match(got: dict, want: dict, what: str, rtol: float = 1e-6, atol: float = 1e-7):
    """Parameters equal DDP's to rounding (rtol 1e-6, atol 1e-7), except the key third of the
    attention's qkv bias: its gradient is mathematically zero (softmax is invariant to adding
    q·b_k to every score of a query), so in floating point it is rounding noise, which Adam
    normalises into steps of up to lr; a different summation order (ZeRO-3 reduce-scatters
    gradient partitions) changes that noise, so those entries are only held to the bound Adam
    allows, STEPS × lr.

    The same holds, rarely, for a weight entry whose gradient nearly cancels in its sum over the
    batch: its rounding noise is then a large part of it, and Adam's m/√v turns that into an
    update difference of a noticeable fraction of lr (seen on an AMD EPYC host: 1 entry of 16384
    of an MLP weight off by 1.3e-7 at ZeRO-3 × 4 ranks, identical on HEAD).  So at most one entry
    in a thousand may leave the rounding tolerance, and only within Adam's bound STEPS × lr;
    every other entry is held to it."""
    for name, p in want.items():
        q = got[name]
        if name.endswith("attn.qkv.bias"):
            d = p.numel() // 3
            torch.testing.assert_close(q[d:2 * d], p[d:2 * d], rtol=0, atol=STEPS * LR, msg=f"{what} {name} (k)")
            q, p = torch.cat([q[:d], q[2 * d:]]), torch.cat([p[:d], p[2 * d:]])
        outside = (q - p).abs() > atol + rtol * p.abs()
        assert int(outside.sum()) <= p.numel() // 1000, (
            f"{what} {name}: {int(outside.sum())} of {p.numel()} entries beyond rounding (max |diff| "
            f"{float((q - p).abs().max()):.3g})")
        torch.testing.assert_close(q, p, rtol=0, atol=STEPS * LR, msg=f"{what} {name} (Adam's bound)")


@pytest.mark.slow
def test_zero_stages_match_ddp_bytes_and_resume_at_two_ranks(tmp_path):
    """2 gloo ranks: DDP, then ZeRO-1/2/3 (each with a save at step 1 and a resume to step 3)."""
    jobs = [("ddp", dict(FIELDS, techniques=[]), None)]
    jobs += [(f"zero{s}", dict(FIELDS, techniques=[f"zero:stage={s},bucket_mb=0.25"]), 1) for s in STAGES]
    results = _spawn(tmp_path, 2, jobs)
    ddp = results[0]["ddp"]
    table = {}
    for s in STAGES:
        for rank, got in enumerate(r[f"zero{s}"] for r in results):
            assert got["losses"] == pytest.approx(ddp["losses"], rel=1e-6, abs=1e-7), (s, got["losses"], ddp["losses"])
            _assert_params_match(got["params"], ddp["params"], f"zero{s}")
            table[(s, rank)] = _check_bytes(got, 2, s)
            assert got["flops"] == results[rank]["ddp"]["flops"] and got["activations"] == results[rank]["ddp"]["activations"]
            # resume: bit-identical parameters and losses
            assert got["resumed_losses"] == got["losses"][1:]
            for name, p in got["params"].items():
                assert torch.equal(got["resumed_params"][name], p), f"zero{s} resume {name}"
            assert any("optim_states" in f for f in got["files"]), got["files"]
        notes = results[0][f"zero{s}"]["notes"]
        assert notes["stage"] == s and notes["dp"] == 2 and notes["deepspeed_estimate"]["per_device_bytes"] > 0
    print("\nper-rank bytes (measured, fp32 paper formula, ratio):", table)


@pytest.mark.slow
def test_accumulation_clipping_precision_and_offload_at_two_ranks(tmp_path):
    """Gradient accumulation and clipping against DDP (losses, parameters, pre-clip norms); bf16
    mode's 16-bit parameters and its mixed-precision bytes (2Ψ + 2Ψ + 12Ψ, sharded); offload of
    optimizer (DeepSpeedCPUAdam) and parameters (stage 3)."""
    acc = dict(FIELDS, grad_clip=0.05)
    jobs = [("ddp", dict(acc, techniques=["grad_accum:steps=2"]), None),
            ("zero2", dict(acc, techniques=["grad_accum:steps=2", "zero:stage=2,bucket_mb=0.25"]), None),
            ("bf16", dict(FIELDS, techniques=["bf16", "zero:stage=2,bucket_mb=0.25"]), None),
            ("offload", dict(FIELDS, techniques=["zero:stage=3,offload_optimizer=cpu,offload_param=cpu"]), None),
            ("plain", dict(FIELDS, techniques=[]), None)]
    results = _spawn(tmp_path, 2, jobs)
    for rank, r in enumerate(results):
        ddp, got = r["ddp"], r["zero2"]
        assert got["losses"] == pytest.approx(ddp["losses"], rel=1e-6, abs=1e-7)
        assert all(n > 0.05 for n in ddp["grad_norms"])  # clipping was active
        assert got["grad_norms"] == pytest.approx(ddp["grad_norms"], rel=1e-5)
        _assert_params_match(got["params"], ddp["params"], "zero2 accumulation+clipping")
        _check_bytes(got, 2, 2)
        bf16 = r["bf16"]
        assert bf16["param_dtypes"] == ["torch.bfloat16"] and bf16["precision"] == "bf16-params+fp32-master"
        assert bf16["losses"][0] == pytest.approx(ddp["losses"][0], rel=1e-2)
        print(f"\nrank {rank} bf16 ZeRO-2 bytes (measured, paper mixed precision, ratio):", _check_bytes(bf16, 2, 2, True))
        off = r["offload"]
        notes = off["notes"]
        assert notes["optimizer_ran"].startswith("deepspeed.ops.adam.DeepSpeedCPUAdam")
        assert notes["offload"]["device_type"] == "cpu" and "moves no bytes" in notes["offload"]["meaning"]
        # DeepSpeedCPUAdam's fused update against torch's AdamW under DDP: equal to rounding
        assert off["losses"] == pytest.approx(r["plain"]["losses"], rel=1e-5)
        _assert_params_match(off["params"], r["plain"]["params"], "offload (DeepSpeedCPUAdam)", rtol=1e-5, atol=1e-6)
        assert off["state"]["params_bytes"] == pytest.approx(4 * notes["params"] / 2, rel=1e-3)


@pytest.mark.slow
def test_zero3_at_four_ranks(tmp_path):
    """4 ranks oversubscribed on 2 cores: ZeRO-3's losses and parameters equal DDP's, per-rank
    bytes the paper's fp32 formula at N_d = 4 (with the fp32 master partition)."""
    jobs = [("ddp", dict(FIELDS, techniques=[]), None),
            ("zero3", dict(FIELDS, techniques=["zero:stage=3,bucket_mb=0.25"]), None)]
    results = _spawn(tmp_path, 4, jobs)
    table = {}
    for rank, r in enumerate(results):
        assert r["zero3"]["losses"] == pytest.approx(r["ddp"]["losses"], rel=1e-6, abs=1e-7)
        _assert_params_match(r["zero3"]["params"], r["ddp"]["params"], "zero3 ws4")
        table[rank] = _check_bytes(r["zero3"], 4, 3)
    print("\nZeRO-3 at 4 ranks, per-rank bytes (measured, fp32 paper formula, ratio):", table)


def test_one_rank_run_through_the_cli(tmp_path):
    """World size 1: DeepSpeed gets a one-rank gloo group; the record carries the bytes and notes."""
    out = tmp_path / "run.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "impls.cli", "run", "--model", "nano", "--steps", "2", "--batch-size",
                           "2", "--seq-len", "16", "--eval-batches", "1", "--technique", "zero:stage=3",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    record = json.loads(out.read_text())
    notes, memory = record["technique_notes"]["zero"], record["memory"]
    psi = record["params"]
    assert psi == notes["params"] > 0  # ZeRO-3's partitioned parameters count their full size
    assert notes["stage"] == 3 and notes["dp"] == 1 and notes["deepspeed_estimate"]["per_device_bytes"] > 0
    assert memory["params_bytes"] == 4 * psi and memory["grads_bytes"] == 4 * psi
    assert memory["optimizer_bytes"] == pytest.approx(12 * psi, rel=1e-3)
    assert record["status"] == "ok" and record["mfu"] > 0


from impls import cli  # noqa: E402


@pytest.mark.parametrize("argv,message", [
    (["--technique", "zero:stage=2,offload_param=cpu"], "zero:offload_param=cpu needs stage=3"),
    (["--technique", "zero", "--technique", "ddp", "--nproc", "2"], "techniques 'zero' and 'ddp' cannot be combined"),
    (["--technique", "zero", "--optimizer", "lion"], "optimizer 'lion' cannot be partitioned by DeepSpeed here; valid: adamw, adam, sgd"),
    (["--technique", "zero:stage=4"], "bad value '4' for zero:stage; valid: 1, 2, 3"),
    (["--technique", "onebit"], "onebit:kind=adam cannot run here: missing"),
    (["--technique", "onebit:kind=lamb"], "the OneBitLamb optimizer"),
    (["--technique", "onebit", "--technique", "zero"], "cannot be combined"),
], ids=["offload-param-stage2", "zero-ddp", "unknown-optimizer", "stage4", "onebit", "onebit-lamb", "onebit-zero"])
def test_refusals_exit_2_before_any_work(argv, message, tmp_path, capsys):
    out = tmp_path / "never" / "run.json"
    status = cli.main(["run", "--model", "nano", "--steps", "3", *argv, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert status == 2 and message in err, err
    assert err.count("\n") == 0 and err.startswith("etbench: error:")
    assert not out.parent.exists()


def test_onebit_refusal_names_every_missing_piece_on_cpu():
    from impls.techniques import onebit

    missing = onebit.missing_pieces("adam", "cpu")
    assert any("CUDA" in m for m in missing)
    if not torch.cuda.is_available():
        assert len(missing) >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="1-bit Adam needs CUDA with NCCL and cupy; no CUDA here")
def test_onebit_on_cuda(tmp_path):
    """On a CUDA machine: runs through the deepspeed engine where this DeepSpeed still ships the
    optimizers and cupy is installed (notes carry the compression ratio), else is refused naming
    what is missing."""
    from impls.techniques import onebit

    out = tmp_path / "run.json"
    missing = onebit.missing_pieces("adam", "cuda")
    status = cli.main(["run", "--model", "nano", "--steps", "3", "--optimizer", "adam", "--device", "cuda",
                       "--technique", "onebit:freeze_step=1", "--out", str(out)])
    if missing:
        assert status == 2
        return
    import json

    assert status == 0
    notes = json.loads(out.read_text())["technique_notes"]["onebit"]
    assert notes["compression"]["ratio"] > 20


def test_in_process_runs_survive_a_process_group_teardown(one_thread):
    """Two one-rank ZeRO runs in one process with :func:`impls.dist.shutdown` between them (as
    the CLI and the benchmarks do): DeepSpeed's cached clone of the destroyed world group is
    released and a new one made.  The process group is torn down again at the end."""
    from impls import dist

    small = dict(FIELDS, steps=1, batch_size=2, seq_len=16)
    try:
        first = train.run(train.Recipe(**dict(small, techniques=["zero:stage=3"])))
        dist.shutdown()
        second = train.run(train.Recipe(**dict(small, techniques=["zero:stage=2"])))
    finally:
        dist.shutdown()
    assert first["final_val_loss"] == pytest.approx(second["final_val_loss"], rel=1e-6)
