"""Pipeline parallelism (``pp``: GPipe, 1F1B, interleaved 1F1B over torch.distributed.pipelining) on
gloo ranks: the same losses and gradient norms as the unpipelined run of the same config, tied
embedding copies identical on the first and last stage, the schedule's bubble against
(p−1)/(v·m+p−1), activations stashed (GPipe m, 1F1B ≤ p), bad options refused before any work,
and a bit-identical resume from the per-rank state."""
import os
import socket
import time

import pytest
import torch

from impls import train
from impls.engines.pipeline_engine import planned_order, simulate, stash_peak
from impls.errors import ConfigError
from impls.techniques.pipeline import bubble_formula

COMMON = dict(model="nano", model_args=dict(n_layer=4), data="synthetic", batch_size=8, seq_len=16, device="cpu",
              eval_batches=1, grad_clip=0.5)
STEPS = 3
SCHEDULES = {"gpipe": "pp:schedule=gpipe,microbatches=4", "1f1b": "pp:schedule=1f1b,microbatches=4",
             "interleaved": "pp:schedule=interleaved,microbatches=4,chunks=2"}


# --------------------------------------------------------------------------- no ranks needed


@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_the_schedules_bubble_is_the_formula(p, m):
    """Each rank's action order (as torch runs it) replayed with t_b = 2 t_f: every rank idles
    (p−1)/(m+p−1) of the step under GPipe and 1F1B, and (p−1)/(v·m+p−1) under interleaved 1F1B
    when m is a multiple of p (Megatron's condition); with m < p torch's interleaving (one round of
    m micro-batches) lands in between, and at m = 1 saves nothing."""
    gpipe = simulate(planned_order("gpipe", p, m), p)
    assert gpipe["idle"] == pytest.approx({r: bubble_formula(p, m) for r in range(p)}, abs=1e-12)
    assert gpipe["stash"] == {r: m for r in range(p)}  # GPipe keeps every micro-batch's activations
    if m >= p:  # torch's 1F1B needs a micro-batch per stage
        one = simulate(planned_order("1f1b", p, m), p)
        assert one["idle"] == pytest.approx(gpipe["idle"], abs=1e-12)
        assert one["stash"] == {r: min(m, p - r) for r in range(p)}
        assert max(one["stash"].values()) <= p < m or m == p
    for v in (2, 4):
        inter = simulate(planned_order("interleaved", p, m, v), p * v, v)
        idle = set(round(x, 12) for x in inter["idle"].values())
        assert len(idle) == 1  # the same share on every rank
        if m % p == 0:
            assert idle.pop() == pytest.approx(bubble_formula(p, m, v), abs=1e-12)
        elif m == 1:
            assert idle.pop() == pytest.approx(bubble_formula(p, m), abs=1e-12)
        else:
            assert bubble_formula(p, m, v) < idle.pop() < bubble_formula(p, m)


def test_a_stash_is_the_forwards_not_yet_backwarded():
    assert stash_peak([(0, "F", 0), (0, "F", 1), (0, "B", 0), (0, "F", 2), (0, "B", 1), (0, "B", 2)]) == 2
    with pytest.raises(RuntimeError, match="deadlock"):  # a backward before its forward cannot run
        simulate({0: [(0, "B", 0), (0, "F", 0)]}, 1)


@pytest.mark.parametrize("mesh, spec, fields, match", [
    ({"pp": 1}, "pp", {}, "pp=1: nothing to pipeline"),
    ({"pp": 2}, "pp", {"model_args": {"n_layer": 3}}, "n_layer=3, not divisible"),
    ({"pp": 2}, "pp:schedule=interleaved", {}, "2×2 = 4 stages"),  # nano's 2 layers into p·v = 4
    ({"pp": 2}, "pp:microbatches=3", {"model_args": {"n_layer": 4}}, "batch_size=8 does not divide"),
    ({"pp": 2}, "pp:schedule=1f1b,microbatches=1", {"model_args": {"n_layer": 4}}, "microbatches >= 2"),
    ({"pp": 2}, "pp:schedule=gpipe,chunks=2", {"model_args": {"n_layer": 4}}, "valid: chunks=1"),
    ({"pp": 2}, "pp:schedule=interleaved,chunks=1", {"model_args": {"n_layer": 4}}, "needs >= 2 model chunks"),
    ({"pp": 2}, "pp:schedule=pipedream", {}, "valid: gpipe, 1f1b, interleaved"),
    ({"pp": 2}, "pp:schedule=interleaved,microbatches=5", {"model_args": {"n_layer": 4}, "batch_size": 10},
     "multiple of max"),
])
def test_bad_pipeline_options_are_refused_before_any_work(mesh, spec, fields, match):
    recipe = train.Recipe(**{**COMMON, "model_args": {}, **fields, "steps": 1, "mesh": mesh, "techniques": [spec]})
    with pytest.raises(ConfigError, match=match):
        train.check_recipe_fields(recipe, world_size=2)


@pytest.mark.parametrize("other", ["mod", "moe", "grad_accum", "fsdp", "zero"])
def test_techniques_that_cannot_run_stage_wise_are_refused_with_the_reason(other):
    recipe = train.Recipe(**{**COMMON, "steps": 1, "mesh": {"pp": 2}, "techniques": ["pp", other]})
    with pytest.raises(ConfigError, match="cannot be combined|pp=2 "):  # zero's own mesh check comes first
        train.check_recipe_fields(recipe, world_size=4)  # pp=2 × dp=2, so data-parallel ones apply


def test_the_cli_exits_2_on_a_bad_pipeline_option(tmp_path):
    from impls import cli

    code = cli.main(["run", "--model", "nano", "--model-arg", "n_layer=4", "--data", "synthetic", "--steps", "1",
                     "--mesh", "pp=1", "--technique", "pp", "--out", str(tmp_path / "x.json")])
    assert code == 2 and not (tmp_path / "x.json").exists()


# --------------------------------------------------------------------------- on ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(fields: dict) -> dict:
    session = train.prepare(train.Recipe(**fields, steps=STEPS))
    engine = session.engine
    losses, norms = [], []
    for step in range(STEPS):
        x, y = session.batches.get("train", step)
        losses.append(engine.train_step(x, y, step))
        norms.append(engine.last_grad_norm)
    val = engine.eval_loss(*session.batches.get("val", 0))
    out = dict(losses=losses, norms=norms, val=val, params=session.model.num_params())
    if session.build.engine == "pipeline":
        out.update(notes=session.build.notes_for_record()["pp"], pp_rank=engine.pp_rank,
                   tied=engine.tied.detach().clone() if engine.tied is not None else None,
                   first=engine.has_first, last=engine.has_last,
                   activations=engine.activation_bytes(*session.batches.get("train", 0)))
    return out


def _rank(rank: int, world: int, port: int, out: str, jobs: list):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from impls import dist

    results = {key: _train(fields) for key, fields in jobs}
    torch.save(results, f"{out}.{rank}")
    dist.shutdown()


def _launch(tmp_path, world: int, jobs: list) -> list[dict]:
    out = tmp_path / f"rank{world}"
    ranks = torch.multiprocessing.start_processes(_rank, args=(world, _free_port(), str(out), jobs), nprocs=world,
                                                  join=False, start_method="spawn")
    deadline = time.monotonic() + 300  # a hung collective fails the test instead of blocking
    while not ranks.join(timeout=2):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"{world} ranks did not finish within 300 s")
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def reference(one_thread):
    """The unpipelined run of the same config, in this process."""
    return _train(dict(COMMON))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, one_thread):
    jobs = [(name, {**COMMON, "mesh": {"pp": 2}, "techniques": [spec]}) for name, spec in SCHEDULES.items()]
    return _launch(tmp_path_factory.mktemp("pp2"), 2, jobs)



@pytest.mark.slow
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_pipelined_losses_equal_the_unpipelined_run(two_ranks, reference, schedule):
    for rank in two_ranks:
        got = rank[schedule]
        assert got["losses"] == pytest.approx(reference["losses"], rel=1e-5, abs=1e-6)
        assert got["norms"] == pytest.approx(reference["norms"], rel=1e-4)
        assert got["val"] == pytest.approx(reference["val"], rel=1e-5)
        assert got["params"] == reference["params"]  # the whole model's Ψ on every rank
    # every rank returns the same step loss (the last stage's, summed over the pipeline group)
    assert two_ranks[0][schedule]["losses"] == two_ranks[1][schedule]["losses"]


@pytest.mark.slow
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_tied_embedding_copies_stay_identical(two_ranks, schedule):
    first, last = (r[schedule] for r in two_ranks)
    assert first["first"] and last["last"] and not first["last"] and not last["first"]
    assert first["tied"] is not None and torch.equal(first["tied"], last["tied"])


@pytest.mark.slow
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_the_run_records_bubble_and_stash(two_ranks, schedule):
    notes = two_ranks[0][schedule]["notes"]
    assert notes == two_ranks[1][schedule]["notes"]  # gathered over the pipeline group
    p, m, v = notes["pp"], notes["microbatches"], notes["chunks"]
    assert notes["executed_order_is_planned"]  # torch ran the order the bubble test replays
    assert notes["schedule_bubble"] == pytest.approx([bubble_formula(p, m, v)] * p, abs=1e-12)
    assert notes["stash"] == notes["stash_from_order"]
    if schedule == "gpipe":
        assert notes["stash"] == [m] * p
    elif schedule == "1f1b":
        assert notes["stash"] == [min(m, p - r) for r in range(p)] and max(notes["stash"]) <= p
    for idle in notes["measured_idle"]:
        assert 0.0 < idle < 1.0
    # the activations one micro-batch leaves per rank: the runtime meter and engine.activation_bytes
    # agree within the input's storage (the runtime micro-batch is a view of the whole batch)
    for rank, r in zip(two_ranks, range(p)):
        assert abs(notes["microbatch_bytes"][r] - rank[schedule]["activations"]) <= 1024
        if v == 1:  # every micro-batch of a stage saves the same bytes: the stash holds `stash` of them
            assert abs(notes["stash_bytes"][r] - notes["stash"][r] * rank[schedule]["activations"]) <= 1024 * m
        else:  # chunks differ (the last holds the LM head and the loss): more than one micro-batch's chunk
            assert notes["stash_bytes"][r] > notes["microbatch_bytes"][r] // v


@pytest.mark.slow
def test_four_stages_and_pp_times_dp(tmp_path, one_thread, reference):
    """pp=4 (one layer per stage) equals the unpipelined run; pp=2 × dp=2 equals 2-rank DDP."""
    jobs = [("pp4", {**COMMON, "mesh": {"pp": 4}, "techniques": ["pp:schedule=1f1b,microbatches=4"]}),
            ("pp2dp2", {**COMMON, "mesh": {"pp": 2}, "techniques": ["pp:schedule=1f1b,microbatches=4"]})]
    ranks = _launch(tmp_path, 4, jobs)
    for rank in ranks:
        assert rank["pp4"]["losses"] == pytest.approx(reference["losses"], rel=1e-5, abs=1e-6)
        assert rank["pp4"]["notes"]["stash"] == [4, 3, 2, 1]
    ddp = _launch(tmp_path, 2, [("ddp", dict(COMMON))])
    for rank in ranks:  # the ddp run's per-rank loss is its shard's; the loop averages over ranks
        mean = [sum(r["ddp"]["losses"][i] for r in ddp) / 2 for i in range(STEPS)]
        got = [sum(r["pp2dp2"]["losses"][i] for r in ranks) / 4 for i in range(STEPS)]
        assert got == pytest.approx(mean, rel=1e-5)
        assert rank["pp2dp2"]["norms"] == pytest.approx(ddp[0]["ddp"]["norms"], rel=1e-4)


class _Stop(Exception):
    """Raised right after the first checkpoint: the run is 'killed' there."""


def _run_rank(rank: int, world: int, port: int, folder: str, mode: str):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from impls import dist, training_state

    recipe = train.Recipe(**{**COMMON, "steps": 4, "eval_every": 1, "mesh": {"pp": 2},
                             "techniques": [SCHEDULES["interleaved"]]})
    state = os.path.join(folder, "state.pt")
    record = None
    if mode == "straight":
        record = train.run(recipe)
    elif mode == "killed":
        save = training_state.save

        def save_then_stop(*args, **kwargs):
            save(*args, **kwargs)
            raise _Stop

        training_state.save = save_then_stop
        try:
            train.run(recipe, save_every=2, checkpoint=state)
        except _Stop:
            pass
    else:
        record = train.run(recipe, resume=state)
    if record is not None:
        torch.save(dict(curve=record["curve"], params=record["params"], notes=record["technique_notes"]["pp"]),
                   os.path.join(folder, f"{mode}.{rank}.pt"))
    dist.shutdown()


def _run_launch(folder, mode: str):
    ranks = torch.multiprocessing.start_processes(_run_rank, args=(2, _free_port(), str(folder), mode), nprocs=2,
                                                  join=False, start_method="spawn")
    deadline = time.monotonic() + 300
    while not ranks.join(timeout=2):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"pp {mode}: ranks did not finish within 300 s")


@pytest.mark.slow
def test_a_pipelined_run_resumes_bit_identically(tmp_path):
    """Through the one training loop: each rank's stages and optimizer state go into the one
    checkpoint file, come back to the same rank, and the resumed curve equals the straight one."""
    for mode in ("straight", "killed"):
        _run_launch(tmp_path, mode)
    payload = torch.load(__import__("io").BytesIO(torch.load(tmp_path / "state.pt", weights_only=False)["payload"]),
                         weights_only=False)
    assert payload["step"] == 2 and payload["engine_sharded"] is True and len(payload["engine"]) == 2
    # rank 0 saved stages 0 and 2 (the embedding among them), rank 1 stages 1 and 3 (the LM head)
    assert any("tok_emb" in k for k in payload["engine"][0]["model"])
    assert any("lm_head" in k for k in payload["engine"][1]["model"])
    _run_launch(tmp_path, "resumed")
    from impls import data, zoo

    recipe = train.Recipe(**{**COMMON, "steps": 4})
    whole = zoo.build("nano", device="meta", **train.model_overrides(recipe, data.load(recipe.data))).num_params()
    for rank in range(2):
        straight = torch.load(tmp_path / f"straight.{rank}.pt", weights_only=False)
        resumed = torch.load(tmp_path / f"resumed.{rank}.pt", weights_only=False)
        assert [p["train_loss"] for p in resumed["curve"]] == [p["train_loss"] for p in straight["curve"]]
        assert [p["val_loss"] for p in resumed["curve"]] == [p["val_loss"] for p in straight["curve"]]
        assert straight["params"] == whole  # the record's Ψ is the whole model's, not the rank's stages
