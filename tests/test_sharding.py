"""Sharded data parallelism: torch FSDP2 (``fsdp``), ZeroRedundancyOptimizer (``zero-redundancy``)
and fairscale OSS/ShardedDDP (``oss``) on gloo ranks against DDP — the same losses and gradient
norms, exact per-rank bytes from the sharding rule (FSDP2: dim-0 shards of ⌈d₀/N⌉ rows, padded;
ZeRO-1/OSS: whole parameters per rank), gradients communicated on the last micro-batch only,
bit-identical resume from the per-rank state — and the CUDA-only techniques (fairscale FSDP,
``nn.DataParallel``) refused on a CPU with the reason, before any work."""
import io
import math
import os
import socket
import time

import pytest
import torch

from impls import cli, techniques, train

pytestmark = pytest.mark.slow

# vocab 63: the embedding's 63 rows do not divide over 2 or 4 ranks, so FSDP2 pads a row
COMMON = dict(model="nano", data="synthetic:vocab=63", batch_size=2, seq_len=16, device="cpu", grad_clip=0.5,
              eval_batches=1)
SHARDED = ["fsdp", "fsdp:mp=bf16", "fsdp:reshard_after_forward=false,offload=cpu", "zero-redundancy", "oss",
           "oss:sharded_ddp=false"]
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _train(fields: dict, steps: int) -> dict:
    session = train.prepare(train.Recipe(**fields))
    engine = session.engine
    x, y = session.batches.get("train", 0)
    activations = engine.activation_bytes(x, y)  # before training, where the run measures it
    losses, norms = [], []
    for step in range(steps):
        x, y = session.batches.get("train", step)
        losses.append(engine.train_step(x, y, step))
        norms.append(engine.last_grad_norm)
    seen, shapes = set(), []
    for p in session.model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            shapes.append(tuple(p.shape))
    owned = [_local(p).numel() for g in engine.local_optimizer.param_groups for p in g["params"]]
    return dict(activations=activations, losses=losses, norms=norms, bytes=engine.state_bytes(), shapes=shapes, owned=owned,
                sharded_state=engine.sharded_state, stage=session.plan.sharding_stage,
                notes=session.build.notes_for_record())


def _accumulate(fields: dict) -> dict:
    """Python-level gradient collectives (FSDP2's reduce-scatter, ShardedDDP's reduce) counted at the
    start of each micro-batch's forward and after the step's backward."""
    import torch.distributed as dist

    session = train.prepare(train.Recipe(**fields))
    calls, marks = [], []
    # FSDP2 reduce-scatters through dist.reduce_scatter_single (torch 2.13; 2.11 has none: reduce_scatter_tensor)
    scatter = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"
    originals = {name: getattr(dist, name) for name in (scatter, "reduce")}

    def counting(name):
        def call(*args, **kwargs):
            calls.append(name)
            return originals[name](*args, **kwargs)
        return call

    handle = session.model.register_forward_pre_hook(lambda *_: marks.append(len(calls)))
    try:
        for name in originals:
            setattr(dist, name, counting(name))
        x, y = session.batches.get("train", 0)
        loss = session.engine.forward_backward(x, y).item()
        marks.append(len(calls))
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        handle.remove()
    return dict(marks=marks, loss=session.ctx.all_mean(loss))


def _resume(fields: dict) -> dict:
    """4 steps straight against 2 steps, the per-rank state through bytes, a fresh build, 2 steps."""
    def run(session, steps, losses):
        for step in steps:
            x, y = session.batches.get("train", step)
            losses.append(session.engine.train_step(x, y, step))

    fields = {**fields, "steps": 4}
    straight, straight_losses = train.prepare(train.Recipe(**fields)), []
    run(straight, range(4), straight_losses)
    first, resumed_losses = train.prepare(train.Recipe(**fields)), []
    run(first, range(2), resumed_losses)
    buffer = io.BytesIO()
    torch.save(first.engine.state_dict(), buffer)
    raw = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    plain = all(type(t) is torch.Tensor for t in _tensors(raw))
    second = train.prepare(train.Recipe(**fields))
    second.engine.load_state_dict(raw)
    run(second, range(2, 4), resumed_losses)
    a, b = straight.engine.state_dict(), second.engine.state_dict()
    identical = all(torch.equal(x, y) for x, y in zip(_tensors(a), _tensors(b), strict=True))
    return dict(straight=straight_losses, resumed=resumed_losses, identical=identical, plain=plain,
                sharded_state=first.engine.sharded_state)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            yield from _tensors(obj[key])
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def _rank(rank: int, world: int, port: int, out: str, jobs: list):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from impls import dist

    kinds = dict(train=lambda f: _train(f, STEPS), accumulate=_accumulate, resume=_resume)
    results = {key: kinds[kind](fields) for key, kind, fields in jobs}
    torch.save(results, f"{out}.{rank}")
    dist.shutdown()


def _launch(tmp_path, world: int, jobs: list) -> list[dict]:
    out = tmp_path / "rank"
    ranks = torch.multiprocessing.start_processes(_rank, args=(world, _free_port(), str(out), jobs), nprocs=world,
                                                  join=False, start_method="spawn")
    deadline = time.monotonic() + 600  # a hung collective fails the test instead of blocking CI
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"{world} ranks did not finish within 600 s")
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]


def _fields(*specs: str) -> dict:
    return {**COMMON, "steps": STEPS, "techniques": list(specs)}


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    jobs = [(spec, "train", _fields(*([spec] if spec != "ddp" else []))) for spec in ["ddp", *SHARDED]]
    jobs += [(f"accum/{spec}", "accumulate", _fields(*([spec] if spec != "ddp" else []), "grad_accum:steps=2"))
             for spec in ("ddp", "fsdp", "zero-redundancy", "oss")]
    jobs += [(f"resume/{spec}", "resume", _fields(spec)) for spec in ("fsdp", "zero-redundancy", "oss")]
    return _launch(tmp_path_factory.mktemp("two"), 2, jobs)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    jobs = [(spec, "train", _fields(*([spec] if spec != "ddp" else []))) for spec in ("ddp", "fsdp",
                                                                                      "zero-redundancy", "oss")]
    return _launch(tmp_path_factory.mktemp("four"), 4, jobs)


# --------------------------------------------------------------------------- losses


@pytest.mark.parametrize("spec", SHARDED)
def test_losses_and_gradient_norms_equal_ddp(two, spec):
    """Same seed, same batches: the sharded runs start from DDP's weights (step 1's loss is the
    same number) and stay on its trajectory; the clipped global gradient norm over the shards
    equals DDP's.  bf16 compute (mp=bf16) moves the losses in the third digit."""
    for rank in two:
        ref, got = rank["ddp"], rank[spec]
        tol = 2e-2 if "bf16" in spec else 1e-5
        assert got["losses"] == pytest.approx(ref["losses"], rel=tol), spec
        assert got["norms"] == pytest.approx(ref["norms"], rel=tol), spec
        if "bf16" not in spec:
            assert got["losses"][0] == pytest.approx(ref["losses"][0], rel=1e-6)
        assert got["sharded_state"] and not ref["sharded_state"]
    if "bf16" not in spec:  # saved activations are the model's, not the wrapper's (FSDP2's gathered
        # parameters are parameters, not activations)
        assert two[0][spec]["activations"] == two[0]["ddp"]["activations"]
    stage = {"fsdp": 3, "zero-redundancy": 1, "oss": 2}.get(spec.split(":")[0])
    assert two[0][spec]["stage"] == (1 if spec == "oss:sharded_ddp=false" else stage)


def test_four_ranks_match_ddp(four):
    for rank in four:
        for spec in ("fsdp", "zero-redundancy", "oss"):
            assert rank[spec]["losses"] == pytest.approx(rank["ddp"]["losses"], rel=1e-5), spec
            assert rank[spec]["norms"] == pytest.approx(rank["ddp"]["norms"], rel=1e-5), spec


# --------------------------------------------------------------------------- per-rank bytes


def _fsdp_expected(shapes, world: int, rank: int) -> dict:
    """FSDP2's rule: every parameter sharded on dim 0 into ⌈d₀/N⌉-row shards, each rank's storage
    padded to that size (params, and the reduce-scattered grads); AdamW's two moments are
    ``zeros_like`` the unpadded local rows, plus a 4-byte ``step`` per tensor on every rank."""
    padded = local = 0
    for shape in shapes:
        d0, row = shape[0], math.prod(shape[1:])
        rows = -(-d0 // world)
        padded += rows * row
        local += max(0, min(rows, d0 - rank * rows)) * row
    return dict(params_bytes=4 * padded, grads_bytes=4 * padded, optimizer_bytes=8 * local + 4 * len(shapes))


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_per_rank_bytes_follow_the_dim0_sharding_rule(two, four, world):
    ranks = two if world == 2 else four
    psi = sum(math.prod(s) for s in ranks[0]["ddp"]["shapes"])
    unsharded = ranks[0]["ddp"]["bytes"]
    assert unsharded["params_bytes"] == 4 * psi  # the tied embedding counted once
    for r, rank in enumerate(ranks):
        got = {k: rank["fsdp"]["bytes"][k] for k in ("params_bytes", "grads_bytes", "optimizer_bytes")}
        assert got == _fsdp_expected(rank["fsdp"]["shapes"], world, r), r
        # ≈ unsharded / N_d: over by the padding rows only
        assert 1 <= got["params_bytes"] / (unsharded["params_bytes"] / world) < 1.02
    moments = sum(rank["fsdp"]["bytes"]["optimizer_bytes"] - 4 * len(rank["fsdp"]["shapes"]) for rank in ranks)
    assert moments == 8 * psi  # the shards partition the moments exactly
    assert ranks[0]["fsdp"]["notes"]["fsdp"]["padded_elements"] > 0  # vocab 63 does not divide


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("spec", ["zero-redundancy", "oss"])
def test_optimizer_sharding_bytes_are_the_owned_parameters(two, four, world, spec):
    """Whole parameters per rank: rank r's optimizer bytes are 8 B per element + 4 B per tensor of
    the parameters it owns; the shares partition the unsharded state exactly; each is ≈ 1/N_d up
    to the imbalance the notes report.  ShardedDDP (oss) keeps the owned gradients only."""
    ranks = two if world == 2 else four
    unsharded = ranks[0]["ddp"]["bytes"]
    psi = unsharded["params_bytes"] // 4
    total, owned_total = 0, 0
    for rank in ranks:
        got, owned = rank[spec]["bytes"], rank[spec]["owned"]
        assert got["optimizer_bytes"] == 8 * sum(owned) + 4 * len(owned)
        assert got["params_bytes"] == unsharded["params_bytes"]
        expected_grads = 4 * sum(owned) if spec == "oss" else unsharded["grads_bytes"]
        assert got["grads_bytes"] == expected_grads
        total += got["optimizer_bytes"]
        owned_total += sum(owned)
    assert owned_total == psi and total == unsharded["optimizer_bytes"]
    notes = ranks[0][spec]["notes"][spec]
    assert notes["elements_per_rank"] == [sum(rank[spec]["owned"]) for rank in ranks]
    largest = max(rank[spec]["bytes"]["optimizer_bytes"] for rank in ranks)
    assert largest / (unsharded["optimizer_bytes"] / world) == pytest.approx(notes["imbalance"], rel=0.01)
    assert notes["imbalance"] < 1.5


# --------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("spec,per_backward", [("fsdp", 3), ("oss", None)])
def test_accumulation_communicates_gradients_on_the_last_micro_batch_only(two, spec, per_backward):
    """Two micro-batches: no reduce-scatter (FSDP2: one per unit = 2 blocks + root) or reduce
    (ShardedDDP: one per parameter) during the first micro-batch, all of them after the second."""
    n_params = len(two[0]["ddp"]["shapes"])
    for rank in two:
        marks = rank[f"accum/{spec}"]["marks"]
        assert marks[0] == 0 and marks[1] == 0, marks  # nothing before the second micro-batch
        assert marks[2] == (per_backward or n_params), marks
    for spec2 in ("fsdp", "zero-redundancy", "oss"):
        assert two[0][f"accum/{spec2}"]["loss"] == pytest.approx(two[0]["accum/ddp"]["loss"], rel=1e-6)


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("spec", ["fsdp", "zero-redundancy", "oss"])
def test_resume_from_the_per_rank_state_is_bit_identical(two, spec):
    for rank in two:
        got = rank[f"resume/{spec}"]
        assert got["sharded_state"] and got["plain"]  # local CPU tensors: no mesh needed to load
        assert got["resumed"] == got["straight"]  # exactly
        assert got["identical"]


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("argv,message", [
    (["--technique", "fairscale-fsdp", "--nproc", "2"], "fairscale 0.4.13's FullyShardedDataParallel needs CUDA"),
    (["--technique", "data-parallel"], "splits a batch over >= 2 CUDA GPUs in one process"),
    (["--technique", "data-parallel", "--nproc", "2"], "is single-process"),
    (["--technique", "fsdp"], "needs a data-parallel size > 1"),
    (["--technique", "fsdp", "--technique", "ddp", "--nproc", "2"], "cannot be combined"),
    (["--technique", "oss", "--technique", "zero-redundancy", "--nproc", "2"], "cannot be combined"),
])
def test_refused_before_any_work_in_one_line(argv, message, tmp_path, capsys):
    out = tmp_path / "out.json"
    capsys.readouterr()
    status = cli.main(["run", "--model", "nano", "--steps", "1", "--device", "cpu", *argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and message in err, err
    assert err.startswith("etbench: error: ") and err.count("\n") == 1, err
    assert not out.exists()


def test_a_wrap_technique_replaces_the_default_ddp():
    for spec in ("fsdp", "oss"):
        names = [s.name for s in train.check_recipe_fields(train.Recipe(steps=1, techniques=[spec]), world_size=2)[0]]
        assert names == [spec]
    names = [s.name for s in train.check_recipe_fields(train.Recipe(steps=1, techniques=["zero-redundancy"]),
                                                       world_size=2)[0]]
    assert sorted(names) == ["ddp", "zero-redundancy"]
    assert techniques.configure([techniques.parse("oss:sharded_ddp=false")]).sharding_stage == 1


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="the refusal is for machines without 2 CUDA GPUs")
def test_cuda_only_techniques_refuse_in_configure():
    for name in ("fairscale-fsdp", "data-parallel"):
        with pytest.raises(Exception, match="CUDA"):
            techniques.configure([techniques.parse(name)], "cpu")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nn.DataParallel needs >= 2 CUDA GPUs in one process; "
                                                          "this machine has fewer")
def test_data_parallel_on_gpus_matches_one_device():
    fields = dict(COMMON, device="cuda", steps=2, grad_clip=None, batch_size=4)
    one = train.prepare(train.Recipe(**fields))
    many = train.prepare(train.Recipe(**{**fields, "techniques": ["data-parallel"]}))
    assert isinstance(many.build.train_parts[0], torch.nn.DataParallel)
    for step in range(2):
        a = one.engine.train_step(*one.batches.get("train", step), step)
        b = many.engine.train_step(*many.batches.get("train", step), step)
        assert b == pytest.approx(a, rel=1e-4)
