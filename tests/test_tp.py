"""Tensor parallelism (``tp``) and sequence parallelism (``tp:sp=true``) on gloo ranks against the
single-process model: the same losses and gradients (the fused ``qkv``/SwiGLU rows put back in
the model's order), the collectives Megatron's scheme issues per layer (counted, forward and
backward apart), per-rank parameter bytes = replicated + sharded/t exactly, saved activations per
layer equal to the implementation's count (and the reduction's shape vs Korthikanti et al.),
MoE/MoD under TP, 2-D meshes (DP×TP, FSDP×TP) at 4 ranks equal to DDP at 2 — and bad layouts
refused before any work."""
import os
import socket
import time

import pytest
import torch

from impls import train
from impls.errors import ConfigError
from impls.techniques.tp import qkv_order, swiglu_order

pytestmark = pytest.mark.slow

COMMON = dict(model="nano", data="synthetic:vocab=63", batch_size=2, seq_len=16, device="cpu", grad_clip=0.5,
              eval_batches=1, steps=3)
LLAMA = dict(norm="rmsnorm", mlp="swiglu", position="rope", n_head=4, n_kv_head=2, bias=False)
CONFIGS = {  # name -> (techniques, model_args)
    "tp": (["tp"], {}),
    "sp": (["tp:sp=true"], {}),
    "tp-llama": (["tp"], LLAMA),
    "sp-llama": (["tp:sp=true"], LLAMA),
    "tp-moe": (["tp", "moe:experts=2"], {}),
    "tp-mod": (["tp", "mod:capacity=0.5,every=2"], {}),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recipe(techniques, model_args, mesh) -> train.Recipe:
    return train.Recipe(**COMMON, techniques=techniques, model_args=model_args, mesh=mesh)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _grads(session) -> dict:
    """Gradients of step 0 in the unsharded model's layout (full tensors, qkv/up rows unpermuted)."""
    x, y = session.batches.get("train", 0)
    session.engine.forward_backward(x, y)
    cfg, t = session.model.cfg, session.dims["tp"]
    out = {}
    for name, p in session.model.named_parameters():
        g = _full(p.grad).detach().clone()
        order = None
        if t > 1 and name.endswith("attn.qkv.weight") or t > 1 and name.endswith("attn.qkv.bias"):
            order = qkv_order(cfg.n_head, cfg.n_kv_head, cfg.head_dim, t)
        elif t > 1 and cfg.mlp == "swiglu" and ".up." in name:
            order = swiglu_order(cfg.d_ff, t)
        if order is not None:
            restored = torch.empty_like(g)
            restored[order] = g
            g = restored
        out[name] = g
    return out


def _train(techniques, model_args, mesh) -> dict:
    session = train.prepare(_recipe(techniques, model_args, mesh))
    engine = session.engine
    x, y = session.batches.get("train", 0)
    activations = engine.activation_bytes(x, y)
    losses, norms = [], []
    for step in range(COMMON["steps"]):
        x, y = session.batches.get("train", step)
        losses.append(engine.train_step(x, y, step))
        norms.append(engine.last_grad_norm)
    return dict(losses=losses, norms=norms, bytes=engine.state_bytes(), notes=session.build.notes_for_record(),
                activations=activations, per_layer=list(session.build.layer_activation_bytes),
                layer_check=train.layer_activations_check(session), psi_rank=train.rank_psi(session),
                grads=_grads(train.prepare(_recipe(techniques, model_args, mesh))))


def _collectives(techniques, model_args, mesh) -> dict:
    """The collectives of one forward and of its backward, apart, with their payload sizes."""
    from impls.loss import lm_loss
    from impls.measure.comm import CommCounter

    session = train.prepare(_recipe(techniques, model_args, mesh))
    x, y = session.batches.get("train", 0)
    with CommCounter() as fwd:
        loss = lm_loss(session.model(x), y)
    with CommCounter() as bwd:
        loss.backward()
    return dict(forward=[(e.op, e.payload_bytes) for e in fwd.events],
                backward=[(e.op, e.payload_bytes) for e in bwd.events])


def _rank(rank: int, world: int, port: int, out: str, jobs: list):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from impls import dist

    kinds = dict(train=_train, collectives=_collectives)
    results = {key: kinds[kind](*args) for key, kind, args in jobs}
    torch.save(results, f"{out}.{rank}")
    dist.shutdown()


def _launch(tmp_path, world: int, jobs: list) -> list[dict]:
    out = tmp_path / "rank"
    ranks = torch.multiprocessing.start_processes(_rank, args=(world, _free_port(), str(out), jobs), nprocs=world,
                                                  join=False, start_method="spawn")
    deadline = time.monotonic() + 600
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"{world} ranks did not finish within 600 s")
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    jobs = [(name, "train", (techs, args, {"tp": 2})) for name, (techs, args) in CONFIGS.items()]
    jobs += [("ddp", "train", ([], {}, {}))]
    jobs += [(f"comm/{name}", "collectives", (CONFIGS[name][0], {}, {"tp": 2})) for name in ("tp", "sp")]
    return _launch(tmp_path_factory.mktemp("tp2"), 2, jobs)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    jobs = [("dp-tp", "train", (["tp"], {}, {"tp": 2})), ("fsdp-tp", "train", (["fsdp", "tp"], {}, {"tp": 2})),
            ("dp-sp", "train", (["tp:sp=true"], {}, {"tp": 2}))]
    return _launch(tmp_path_factory.mktemp("tp4"), 4, jobs)


@pytest.fixture(scope="module")
def single():
    torch.set_num_threads(1)
    out = {}
    for name, (techs, args) in CONFIGS.items():
        plain = [t for t in techs if not t.startswith("tp")]
        session = train.prepare(_recipe(plain, args, {}))
        losses = []
        for step in range(COMMON["steps"]):
            x, y = session.batches.get("train", step)
            losses.append(session.engine.train_step(x, y, step))
        x, y = session.batches.get("train", 0)
        session.engine.activation_bytes(x, y)
        out[name] = dict(losses=losses, grads=_grads(train.prepare(_recipe(plain, args, {}))),
                         per_layer=list(session.build.layer_activation_bytes),
                         params=session.engine.state_bytes()["params_bytes"])
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_losses_and_gradients_equal_the_unsharded_model(two, single, name):
    """Same seed, same batches: TP and TP+SP compute the unsharded model's function (the qkv rows
    are relabelled, not changed), so losses and every gradient agree to fp32 rounding."""
    ref = single[name]
    for rank in two:
        got = rank[name]
        assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6), name
        assert got["grads"].keys() == ref["grads"].keys()
        for key, g in ref["grads"].items():
            torch.testing.assert_close(got["grads"][key], g, rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")
    assert two[0][name]["norms"] == two[1][name]["norms"]  # one global norm on every rank


def test_per_rank_parameter_bytes_are_replicated_plus_sharded_over_t(two, single):
    for name in ("tp", "tp-llama"):
        notes = two[0][name]["notes"]["tp"]
        assert notes["sharded_params"] > 5 * notes["replicated_params"]  # the blocks' GEMMs dominate
        want = 4 * (notes["replicated_params"] + notes["sharded_params"] // 2)
        for rank in two:
            assert rank[name]["bytes"]["params_bytes"] == want
            assert rank[name]["bytes"]["grads_bytes"] == want
        assert 4 * (notes["replicated_params"] + notes["sharded_params"]) == single[name]["params"]


def _big(events, size):
    return [op for op, payload in events if payload >= size]


def test_megatron_collectives_two_all_reduces_forward_two_backward_per_layer(two):
    """Shoeybi et al. 2019, §3: g after attention's and the MLP's row-parallel GEMM in forward,
    f before their column-parallel GEMMs in backward -- 4 all-reduces of (b, s, h) per layer and
    nothing else."""
    n_layer, sbh_bytes = 2, 4 * COMMON["batch_size"] * COMMON["seq_len"] * 64
    for rank in two:
        comm = rank["comm/tp"]
        assert comm["forward"] == [("all_reduce", sbh_bytes)] * (2 * n_layer)
        assert comm["backward"] == [("all_reduce", sbh_bytes)] * (2 * n_layer)


def test_sequence_parallel_collectives(two):
    """Korthikanti et al. 2022, §4.2.2: each forward all-reduce becomes a reduce-scatter into the
    sequence shards plus an all-gather before the next column-parallel GEMM (2 + 2 per layer),
    plus one all-gather of the residual stream before the final norm.  In backward, PyTorch's
    styles all-gather the row-parallel outputs' gradients (2 per layer, +1 for the first block's
    input) and *all-reduce* (then split) the column-parallel inputs' gradients where Megatron
    reduce-scatters (2 per layer).  The replicated norms' weight gradients leave backward as
    partial sums over the sequence shards (DTensor's ``Partial`` placement): nothing small is
    communicated in backward, they are all-reduced where the step first reads them."""
    n_layer, full = 2, 4 * COMMON["batch_size"] * COMMON["seq_len"] * 64
    for rank in two:
        comm = rank["comm/sp"]
        fwd = _big(comm["forward"], full // 2)
        assert sorted(fwd) == sorted(["all_gather"] * (2 * n_layer + 1) + ["reduce_scatter"] * (2 * n_layer))
        bwd = _big(comm["backward"], full // 2)
        assert sorted(bwd) == sorted(["all_gather"] * (2 * n_layer + 1) + ["all_reduce"] * (2 * n_layer))
        assert not [op for op, payload in comm["backward"] if payload < full // 2]


def test_activations_per_layer_match_the_count_and_shrink_like_the_paper(two, single):
    """Exact per-layer saved bytes = :func:`implementation_per_layer`; the reduction vs the
    unsharded layer is TP (4 + 12/t)/16 and TP+SP (2 + 14/t)/16 here (fp32, fused SDPA, no
    dropout), against the paper's (10 + 24/t + 5as/ht)/(34 + 5as/h) and (34/t + 5as/ht)/(34 + 5as/h)."""
    base = single["tp"]["per_layer"][0]
    for name, t_formula in (("tp", (4 + 12 / 2) / 16), ("sp", (2 + 14 / 2) / 16)):
        check = two[0][name]["layer_check"]
        assert check["measured_over_implementation"] == 1.0, name
        got = two[0][name]["per_layer"][0] / base
        assert got == pytest.approx(check["implementation_reduction_vs_no_parallelism"], rel=1e-9)
        assert got == pytest.approx(t_formula, rel=0.02)  # the small sb, sab terms aside
        assert abs(got - check["paper_reduction_vs_no_parallelism"]) < 0.07  # the paper's shape
    assert two[0]["sp"]["per_layer"][0] < two[0]["tp"]["per_layer"][0]


def test_two_d_meshes_at_four_ranks_equal_ddp_at_two(four, two):
    """dp=2 × tp=2: DP×TP (composable replicate over the DTensor blocks), FSDP×TP (2-D DTensor
    parameters) and DP×(TP+SP) train on DDP-at-2's batches with DDP-at-2's losses and norms."""
    for name in ("dp-tp", "fsdp-tp", "dp-sp"):
        for rank in range(4):
            ref = two[rank // 2]["ddp"]  # ranks 0,1 share dp shard 0; ranks 2,3 dp shard 1
            got = four[rank][name]
            assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5), (name, rank)
            assert got["norms"] == pytest.approx(ref["norms"], rel=1e-5), (name, rank)
    # FSDP×TP: each rank holds 1/dp of its tp shard
    tp_bytes = four[0]["dp-tp"]["bytes"]["params_bytes"]
    assert four[0]["fsdp-tp"]["bytes"]["params_bytes"] == pytest.approx(tp_bytes / 2, rel=0.02)


@pytest.mark.parametrize("techniques, mesh, args, message", [
    (["tp"], {}, {}, "needs a tensor-parallel size > 1"),
    (["tp"], {"tp": 4}, {}, "does not divide n_head=2"),
    (["tp:sp=true"], {"tp": 2}, {"seq_len": 15}, "seq_len=15 is not divisible by tp=2"),
    (["tp:sp=true", "mod"], {"tp": 2}, {}, "top-k router ranks tokens over the whole sequence"),
    (["tp:sp=true", "moe"], {"tp": 2}, {}, "routed token lists"),
    (["tp:sp=true", "pp:schedule=gpipe,microbatches=2"], {"tp": 2, "pp": 2}, {}, "residual stream"),
    (["tp", "fuse"], {"tp": 2}, {}, "cannot be combined"),
    ([], {"tp": 2}, {}, "needs a technique that shards over 'tp'"),
])
def test_bad_layouts_are_refused_before_any_work(techniques, mesh, args, message):
    fields = {**COMMON, **args}
    recipe = train.Recipe(**{**fields, "techniques": techniques, "mesh": mesh})
    with pytest.raises(ConfigError, match=message):
        train.check_recipe_fields(recipe, world_size=4)


# --------------------------------------------------------------------------- with pipeline parallelism

PIPE = dict(COMMON, batch_size=4, model_args={"n_layer": 4})
PIPE_TECHNIQUES = ["pp:schedule=1f1b,microbatches=2", "tp"]


def _pipe_train(techniques, mesh) -> dict:
    session = train.prepare(train.Recipe(**{**PIPE, "techniques": techniques, "mesh": mesh}))
    losses, norms = [], []
    for step in range(PIPE["steps"]):
        x, y = session.batches.get("train", step)
        losses.append(session.engine.train_step(x, y, step))
        norms.append(session.engine.last_grad_norm)
    return dict(losses=losses, norms=norms, bytes=session.engine.state_bytes())


def _pipe_rank(rank: int, world: int, port: int, out: str, jobs: list):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from impls import dist

    results = {key: _pipe_train(*args) for key, args in jobs}
    torch.save(results, f"{out}.{rank}")
    dist.shutdown()


def _pipe_launch(tmp_path, world, jobs):
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "rank"
    ranks = torch.multiprocessing.start_processes(_pipe_rank, args=(world, _free_port(), str(out), jobs),
                                                  nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + 600
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"{world} ranks did not finish within 600 s")
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]


def test_tp_times_pp_at_four_ranks_and_three_d_at_eight_equal_the_reference(tmp_path):
    """TP × PP (pp=2 × tp=2: the pipeline split first, then each stage's blocks sharded,
    torchtitan's order) equals the single-process run; DP × TP × PP (dp=2 × pp=2 × tp=2, 8 ranks on
    this 2-core machine: slow, exact) equals DDP at 2 ranks, rank by rank of the data-parallel
    shard.  Each (pp, tp) rank holds its stage's replicated parameters plus 1/t of its blocks'."""
    torch.set_num_threads(1)
    single = _pipe_train([], {})
    four = _pipe_launch(tmp_path / "four", 4, [("tp-pp", (PIPE_TECHNIQUES, {"pp": 2, "tp": 2}))])
    for rank in four:
        assert rank["tp-pp"]["losses"] == pytest.approx(single["losses"], rel=1e-5)
        assert rank["tp-pp"]["norms"] == pytest.approx(single["norms"], rel=1e-5)
        assert rank["tp-pp"]["bytes"]["params_bytes"] < single["bytes"]["params_bytes"] / 3
    eight = _pipe_launch(tmp_path / "eight", 8, [("3d", (PIPE_TECHNIQUES, {"pp": 2, "tp": 2}))])
    two = _pipe_launch(tmp_path / "two", 2, [("ddp", ([], {}))])
    for rank, result in enumerate(eight):
        dp_rank = (rank // 2) % 2  # mesh (pp, dp, tp): rank = 4·pp + 2·dp + tp
        assert result["3d"]["losses"] == pytest.approx(two[dp_rank]["ddp"]["losses"], rel=1e-5), rank
        assert result["3d"]["norms"] == pytest.approx(two[dp_rank]["ddp"]["norms"], rel=1e-5), rank
