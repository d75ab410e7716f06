"""Communication volume (issue 10): :class:`impls.measure.comm.CommCounter` counts every
collective exactly, on two real gloo ranks; ``etbench comm`` writes a sane record; bad input
exits 2 before any work.

The two ranks run every scenario once (a module fixture) and rank 0 saves what it saw:

* each ``torch.distributed`` collective, under each of its names, with a known tensor;
  a function object bound *before* the scope (as DeepSpeed's TorchBackend caches
  ``all_gather_into_tensor``); a functional collective; an object collective;
* DDP through the ``ddp`` technique and the engine's ``train_step`` (its reducer all-reduces
  from C++): payload == gradient bytes of the trainable parameters (+ the engine's one int64
  target count), traffic == 2(n-1)/n of that, and the gradients bit-identical with and
  without the counter;
* torch FSDP2 (``fully_shard`` per block and at the root, ``reshard_after_forward=True``):
  all-gather forward + all-gather backward + reduce-scatter = 3Ψ·b, traffic 3Ψ·b·(n-1)/n;
* ``ZeroRedundancyOptimizer`` over DDP: the gradient all-reduce plus each parameter broadcast
  once from the rank that owns its shard.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from impls import cli
from impls.measure import comm

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
N = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _events(counter):
    return [(e.op, e.payload_bytes, e.group_size) for e in counter.events]


def _rank(rank: int, port: int, out: str):
    import warnings

    warnings.simplefilter("ignore")  # the deprecated aliases are called on purpose
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(N), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    from impls import train, zoo
    from impls.loss import lm_loss
    from impls.measure.comm import CommCounter

    got = {}
    # ------------------------------------------------------------------ every op, every name
    dist.init_process_group("gloo")
    c10d = dist.distributed_c10d
    bound_early = dist.all_gather_into_tensor  # what DeepSpeed's TorchBackend keeps
    t = torch.arange(10, dtype=torch.float32)  # 40 bytes
    out20 = torch.empty(20)
    cases = {
        "all_reduce": lambda: dist.all_reduce(t),
        "all_reduce_int64": lambda: dist.all_reduce(torch.zeros(3, dtype=torch.int64)),
        "broadcast": lambda: dist.broadcast(t, src=0),
        "reduce": lambda: dist.reduce(t, dst=0),
        "all_gather_into_tensor": lambda: dist.all_gather_into_tensor(out20, t),
        "_all_gather_base": lambda: c10d._all_gather_base(out20, t),
        "all_gather_single": lambda: dist.all_gather_single(out20, t),
        "all_gather_bound_early": lambda: bound_early(out20, t),
        "all_gather_list": lambda: dist.all_gather([torch.empty(10), torch.empty(10)], t),
        "reduce_scatter_tensor": lambda: dist.reduce_scatter_tensor(torch.empty(10), out20),
        "_reduce_scatter_base": lambda: c10d._reduce_scatter_base(torch.empty(10), out20),
        "reduce_scatter_single": lambda: dist.reduce_scatter_single(torch.empty(10), out20),
        "all_to_all_single": lambda: dist.all_to_all_single(torch.empty(10), t),
        "gather": lambda: dist.gather(t, [torch.empty(10), torch.empty(10)] if rank == 0 else None, dst=0),
        "scatter": lambda: dist.scatter(torch.empty(10), [t, t] if rank == 0 else None, src=0),
        "send_recv": lambda: dist.send(t, dst=1) if rank == 0 else dist.recv(t, src=0),
        "barrier": lambda: dist.barrier(),
        "funcol_all_reduce": lambda: funcol.wait_tensor(funcol.all_reduce(t, "sum", dist.group.WORLD)),
        "all_gather_object": lambda: dist.all_gather_object([None] * N, "abc"),
    }
    for name, call in cases.items():
        try:
            with CommCounter() as c:
                call()
            got[name] = _events(c)
        except Exception as e:  # an op gloo lacks: say so rather than fail the others
            got[name] = f"{type(e).__name__}: {e}"
    with CommCounter() as c:
        dist.all_reduce(t)
    got["summary_all_reduce"] = c.summary()

    # ------------------------------------------------------------------ DDP via the technique
    # (impls.dist.init joins the process group above)
    s = train.prepare(train.Recipe(model="nano", steps=1, batch_size=4, seq_len=32, device="cpu",
                                   techniques=["ddp:bucket_mb=0.1"]))
    x, y = s.batches.get("train", 0)
    params = [p for p in s.model.parameters() if p.requires_grad]
    s.engine.forward_backward(x, y)
    plain = [p.grad.clone() for p in params]
    with CommCounter() as c:
        s.engine.forward_backward(x, y)
    got["ddp_identical"] = all(torch.equal(a, p.grad) for a, p in zip(plain, params))
    with CommCounter() as c:
        s.engine.train_step(x, y, 0)
    got["ddp"] = dict(events=_events(c), summary=c.summary(),
                      grad_bytes=sum(p.numel() * p.element_size() for p in params),
                      buffer_bytes=sum(b.numel() * b.element_size() for b in s.model.buffers()))

    # ------------------------------------------------------------------ FSDP2
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    m = zoo.build("nano")
    psi = sum(p.numel() for p in m.parameters())
    for block in m.blocks:
        fully_shard(block, reshard_after_forward=True)
    fully_shard(m, reshard_after_forward=True)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x = torch.randint(0, m.cfg.vocab_size, (2, 16))
    y = torch.randint(0, m.cfg.vocab_size, (2, 16))
    for i in range(2):  # the first step also initialises FSDP lazily
        with CommCounter() as c:
            lm_loss(m(x), y).backward()
            opt.step()
            opt.zero_grad()
    got["fsdp2"] = dict(events=_events(c), summary=c.summary(), psi=psi,
                        root_psi=sum(p.numel() for n, p in m.named_parameters() if not n.startswith("blocks.")))

    # ------------------------------------------------------------------ ZeroRedundancyOptimizer
    from torch.distributed.optim import ZeroRedundancyOptimizer

    torch.manual_seed(0)
    m = torch.nn.parallel.DistributedDataParallel(zoo.build("nano"))
    opt = ZeroRedundancyOptimizer(m.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-3)
    with CommCounter() as c:
        lm_loss(m(x), y).backward()
        opt.step()
        opt.zero_grad()
    got["zero"] = dict(events=_events(c), summary=c.summary(), psi=psi, tensors=len(list(m.parameters())))
    dist.destroy_process_group()
    if rank == 0:
        torch.save(got, out)


@pytest.fixture(scope="module")
def seen(tmp_path_factory):
    out = tmp_path_factory.mktemp("comm") / "seen.pt"
    ranks = torch.multiprocessing.start_processes(_rank, args=(_free_port(), str(out)), nprocs=N, join=False,
                                                  start_method="spawn")
    deadline = time.monotonic() + 300  # a hung collective fails the tests instead of blocking
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("ranks did not finish within 300 s")
    return torch.load(out)


# (op, S, n) per scenario: S in nccl-tests' convention (the full buffer)
EXPECTED = {
    "all_reduce": [("all_reduce", 40, 2)],
    "all_reduce_int64": [("all_reduce", 24, 2)],
    "broadcast": [("broadcast", 40, 2)],
    "reduce": [("reduce", 40, 2)],
    "all_gather_into_tensor": [("all_gather", 80, 2)],
    "_all_gather_base": [("all_gather", 80, 2)],
    "all_gather_single": [("all_gather", 80, 2)],
    "all_gather_bound_early": [("all_gather", 80, 2)],
    "all_gather_list": [("all_gather", 80, 2)],
    "reduce_scatter_tensor": [("reduce_scatter", 80, 2)],
    "_reduce_scatter_base": [("reduce_scatter", 80, 2)],
    "reduce_scatter_single": [("reduce_scatter", 80, 2)],
    "all_to_all_single": [("all_to_all", 40, 2)],
    "gather": [("gather", 80, 2)],
    "scatter": [("scatter", 80, 2)],
    "send_recv": [("send", 40, 2)],  # rank 0's side: it sends
    "barrier": [],
    "funcol_all_reduce": [("all_reduce", 40, 2)],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_collective_is_counted_once_with_its_full_buffer(seen, name):
    """One call of each op, under each of its names (deprecated aliases call the new ones: still
    one call), or a function bound before the scope opened: one event of nccl-tests' size."""
    if name in ("all_gather_single", "reduce_scatter_single") and not hasattr(torch.distributed, name):
        pytest.skip(f"torch {torch.__version__} has no torch.distributed.{name} (torch 2.13 has it, 2.11 not)")
    assert seen[name] == EXPECTED[name]


def test_an_object_collective_counts_as_the_tensor_collectives_it_is_made_of(seen):
    # all_gather_object: the sizes (one int64 per rank), then the padded pickles
    ops = seen["all_gather_object"]
    assert [op for op, _, _ in ops] == ["all_gather", "all_gather"] and ops[0][1] == 8 * N


def test_summary_is_json_and_applies_the_ring_model(seen):
    s = seen["summary_all_reduce"]
    json.dumps(s)
    assert s["world_size"] == N and s["calls"] == {"all_reduce": 1} and s["payload_bytes"] == {"all_reduce": 40}
    assert s["traffic_bytes"] == 2 * (N - 1) / N * 40 and s["unrecognised"] == {}


def test_ddp_counts_every_bucket_from_the_cpp_reducer(seen):
    """DDP's reducer all-reduces its buckets from C++ (a Python wrapper of torch.distributed would
    see none of them).  With 0.1 MiB buckets there are several; together they are exactly the
    trainable parameters' gradient bytes, and the engine adds one int64 target count."""
    ddp = seen["ddp"]
    grads = ddp["grad_bytes"]
    events = ddp["events"]
    assert ddp["buffer_bytes"] == 0  # nano (learned positions) has no buffers for DDP to broadcast
    assert [e for e in events if e[0] != "all_reduce"] == []
    buckets = [b for op, b, n in events if b != 8]
    assert len(buckets) > 1 and sum(buckets) == grads
    s = ddp["summary"]
    assert s["payload_bytes"]["all_reduce"] == grads + 8
    assert s["traffic_bytes"] == round(2 * (N - 1) / N * (grads + 8))
    assert seen["ddp_identical"], "the counter changed DDP's gradients"


def test_fsdp2_moves_three_psi(seen):
    """FSDP2 with reshard_after_forward: each parameter all-gathered in forward and again in
    backward, each gradient reduce-scattered: 3Ψ·b payload, 3Ψ·b·(n-1)/n traffic (ZeRO-3's 1.5×
    DDP's 2Ψ; Rajbhandari et al. 2020 §7.2.2)."""
    f = seen["fsdp2"]
    b = 4  # fp32
    s = f["summary"]
    assert s["payload_bytes"] == {"all_gather": 2 * f["psi"] * b, "reduce_scatter": f["psi"] * b}
    assert s["traffic_bytes"] == round(3 * f["psi"] * b * (N - 1) / N)
    assert s["calls"]["reduce_scatter"] == 3  # root + 2 blocks


def test_zero_redundancy_optimizer_broadcasts_each_parameter_once(seen):
    """torch's ZeroRedundancyOptimizer under DDP: the full gradient all-reduce (2Ψ·b·(n-1)/n) and,
    after each rank updates its shard, one broadcast per parameter from its owner (Ψ·b payload)."""
    z = seen["zero"]
    b = 4
    s = z["summary"]
    assert s["payload_bytes"] == {"all_reduce": z["psi"] * b, "broadcast": z["psi"] * b}
    assert s["calls"] == {"all_reduce": 1, "broadcast": z["tensors"]}  # one bucket; one broadcast per tensor
    assert s["traffic_bytes"] == round(2 * (N - 1) / N * z["psi"] * b + z["psi"] * b)


def test_ring_traffic_model():
    assert comm.ring_traffic("all_reduce", 100, 4) == 150
    assert comm.ring_traffic("all_gather", 100, 4) == 75
    assert comm.ring_traffic("broadcast", 100, 4) == 100
    with pytest.raises(ValueError, match="valid: all_reduce"):
        comm.ring_traffic("allreduce", 1, 2)


def test_a_counter_without_a_process_group_counts_nothing():
    with comm.CommCounter() as c:
        torch.ones(3).sum()
    assert c.summary()["calls"] == {} and c.summary()["world_size"] == 1


# ---------------------------------------------------------------------------- etbench comm


def test_etbench_comm_writes_one_record_with_both_schemes(tmp_path):
    out = tmp_path / "comm.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "impls.cli", "comm", "--nproc", "2", "--sizes", "4K,64K",
                           "--iters", "3", "--warmup", "1", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    assert record["kind"] == "comm" and record["world_size"] == 2 and record["backend"] == "gloo"
    assert record["oversubscribed"] == (2 > record["cores"])
    rows = {(r["scheme"], r["size_bytes"]): r for r in record["results"]}
    assert set(rows) == {(s, z) for s in ("allreduce", "ps") for z in (4096, 65536)}
    for (scheme, size), r in rows.items():
        t = r["time_s"]
        assert t["n"] == 3 and 0 < t["ci95"][0] <= t["median"] <= t["ci95"][1]
        assert r["algbw_Bps"]["median"] == pytest.approx(size / t["median"])
        if scheme == "allreduce":  # 2(n-1)/n = 1 at n = 2
            assert r["busbw_Bps"]["median"] == pytest.approx(r["algbw_Bps"]["median"])
        else:
            assert r["root_bytes_per_step"] == 2 * (2 - 1) * size and "busbw_Bps" not in r
    assert not list(tmp_path.glob(".comm.json*")), "a temporary file was left behind"


BAD = [
    (["--sizes", "0"], "positive"),
    (["--sizes=-4K"], "positive"),
    (["--sizes", "6"], "multiple of 4"),
    (["--sizes", "lots"], "not a size"),
    (["--sizes", "4Q"], "unknown unit"),
    (["--nproc", "1"], "--nproc must be >= 2"),
    (["--schemes", "allreduce,tree"], "unknown scheme 'tree'; valid: allreduce, ps"),
    (["--iters", "0"], "--iters must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--device", "tpu"], "unknown device 'tpu'"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_and_status_2_before_any_work(tmp_path, capsys, args, message):
    out = tmp_path / "absent" / "comm.json"
    status = cli.main(["comm", "--nproc", "2", "--sizes", "4K", *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("etbench: error: ") and message in err, err
    assert not out.parent.exists()


def test_the_asv_class_has_a_fixed_small_quick_grid_of_valid_commands():
    """benchmarks/bench_comm.py: scheme × world size, the quick profile world size 2 only and a
    few sizes (one ~10 s launch); every size it passes is one `etbench comm` accepts."""
    import argparse
    import importlib

    sys.path.insert(0, str(REPO))  # fairscale installs a top-level `benchmarks` package: ours first
    for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        del sys.modules[name]
    bench = importlib.import_module("benchmarks.bench_comm")
    from impls import commbench

    assert bench.CommBandwidth.params == (["allreduce", "ps"], bench.WORLD_SIZES)
    p = argparse.ArgumentParser()
    commbench.add_arguments(p)
    if bench.common.profile_name() == "quick":
        assert bench.WORLD_SIZES == [2] and len(bench.SETTINGS["sizes"]) <= 4
    spec = commbench.validate(p.parse_args(["--sizes", ",".join(bench.SETTINGS["sizes"]),
                                            "--iters", str(bench.SETTINGS["iters"])]), launched=False)
    assert len(spec.sizes) == len(bench.SETTINGS["sizes"])
    record = dict(results=[dict(scheme="ps", size_bytes=s, link_Bps=dict(median=s * 1e3), algbw_Bps=dict(median=s),
                                time_s=dict(median=1.0)) for s in (4, 8)])
    assert bench.CommBandwidth().track_busbw({2: record}, "ps", 2) == 8e3 / 1e9
